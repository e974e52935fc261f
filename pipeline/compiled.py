"""Which build runs: the hot modules compiled by mypyc, or the same source interpreted.

Contract: ``scripts/compile`` (run by ``scripts/install``) compiles the
modules in ``MODULES`` from their unchanged ``.py`` files into
``build/mypyc`` and writes a manifest there with the SHA-256 of each source
and the extension file built from it. ``activate()`` (called once, from
``pipeline/__init__.py``) puts an import finder first on ``sys.meta_path``
that loads those extensions instead of the ``.py`` files, but only when
every listed source still has the hash it was compiled from: a stale build
never runs. ``USTACK_PURE=1``, no build (no compiler at install time) or a
stale one: everything runs interpreted. ``MODE`` says which ("compiled" or
"pure") and ``REASON`` why; each process logs both at start.

The build is all or nothing, so compiled and interpreted versions of one
class never meet in a process.

What compiling changes for the code around it: compiled functions check
their arguments against the annotations (an annotation that lies fails
compiled only); calls between compiled modules are direct, so replacing a
function or attribute of a compiled module or class from outside (a test's
monkeypatch) has no effect on them or fails; interpreted code may not
subclass a compiled class (mypyc's ``allow_interpreted_subclasses`` would
allow it, slower).  ``tests/unit/test_compiled.py`` runs each listed module
both ways on the same inputs, the TCP core end to end in a process of each
build (``tests/unit/tcp_script.py``).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "mypyc"
MANIFEST = BUILD_DIR / "manifest.json"

# Stable, hot, and compiled without changing behaviour: the wire codecs, the
# bus codec, admission, routing, and the whole TCP core -- sequence numbers
# (plain ints since seqnum became functions, so the core's arithmetic runs on
# machine integers), the connection and its roles, the demultiplexer and the
# small modules they import.  Not here: workers.tcp.errors (mypyc cannot
# compile a subclass of RuntimeError); workers.core (its StatelessCore is the
# base of interpreted cores, which a compiled class cannot be without a
# mypyc-only decorator); the services, hosting and relay (application code
# above the connection, not tried); the package __init__ files; and the
# process shells (worker shell, ingress, egress), mostly I/O.  A dataclass
# must not inherit an annotated attribute from a compiled mixin (compiled, it
# looks like a field with a default; see icmp.EchoFields).  Interpreted code
# calls compiled classes as usual, but must not monkeypatch them or their
# modules (tests inject instead).
MODULES: tuple[str, ...] = (
    "pipeline.wire.addr",
    "pipeline.wire.checksum",
    "pipeline.wire.ports",
    "pipeline.wire.ipv4",
    "pipeline.wire.udp",
    "pipeline.wire.tcp",
    "pipeline.wire.ipv6",
    "pipeline.wire.icmp",
    "pipeline.wire.icmpv6",
    "pipeline.fragments",
    "pipeline.flow",
    "pipeline.bus.messages",
    "pipeline.ratelimit",
    "pipeline.admission",
    "pipeline.routing",
    "workers.tcp.scoreboard",
    "workers.tcp.rtt",
    "workers.tcp.sendbuf",
    "workers.tcp.congestion",
    "workers.tcp.reassembly",
    "workers.tcp.rack",
    "pipeline.wire.seqnum",
    "workers.tcp.config",
    "workers.tcp.events",
    "workers.tcp.options",
    "workers.tcp.timers",
    "workers.tcp.segments",
    "workers.tcp.isn",
    "workers.tcp.syncookies",
    "workers.tcp.receiver",
    "workers.tcp.sender",
    "workers.tcp.recovery",
    "workers.tcp.connection",
    "workers.tcp.icmp_errors",
    "workers.tcp.demux",
)

MODE = "pure"
REASON = "not activated"


def source_path(module: str) -> pathlib.Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def source_hashes() -> dict[str, str]:
    """SHA-256 of each compiled module's source, as the manifest records it."""
    return {m: hashlib.sha256(source_path(m).read_bytes()).hexdigest() for m in MODULES}


class _ExtensionFinder(importlib.abc.MetaPathFinder):
    """Finds the listed modules (and mypyc's shared runtime module) in the build."""

    def __init__(self, files: dict[str, pathlib.Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        so = self.files.get(fullname)
        if so is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


def _usable_build() -> tuple[dict[str, pathlib.Path] | None, str]:
    """The extension file of each module if the build matches the sources, else why not."""
    if os.environ.get("USTACK_PURE", "") not in ("", "0"):
        return None, "USTACK_PURE is set"
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return None, "no compiled build (scripts/install builds one when gcc is there)"
    if manifest.get("abi") != importlib.machinery.EXTENSION_SUFFIXES[0]:
        return None, "build is for another Python"
    if manifest.get("sources") != source_hashes():
        return None, "build is stale (a source changed since scripts/install)"
    files = {name: BUILD_DIR / rel for name, rel in manifest.get("files", {}).items()}
    if not all(f.is_file() for f in files.values()) or not set(MODULES) <= files.keys():
        return None, "build is incomplete"
    return files, "build matches the sources"


def activate() -> None:
    """Load compiled modules from now on when a usable build exists (idempotent)."""
    global MODE, REASON
    if any(isinstance(f, _ExtensionFinder) for f in sys.meta_path):
        return
    loaded = [m for m in MODULES if m in sys.modules]
    if loaded:  # too late to swap them: stay consistent
        MODE, REASON = "pure", f"imported before activation: {loaded}"
        return
    files, REASON = _usable_build()
    if files is None:
        MODE = "pure"
        return
    sys.meta_path.insert(0, _ExtensionFinder(files))
    MODE = "compiled"


def is_compiled(module: ModuleType) -> bool:
    """True if the module object was loaded from an extension, not from its .py file."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)
