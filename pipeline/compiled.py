"""Which build runs: the hot modules compiled by mypyc, or the same source interpreted.

Contract: ``scripts/compile`` (run by ``scripts/install``) compiles the
modules in ``MODULES`` from their unchanged ``.py`` files into
``build/mypyc`` and writes a manifest there with the SHA-256 of each source
(and, when they can vouch for it, its size and modification and change
times) and the extension file built from it. ``activate()`` (called from
``pipeline/__init__.py``) puts an import finder first on ``sys.meta_path``
and reads no file: importing ``pipeline`` costs nothing (stackctl, the
tools). The first time a listed module is imported, the finder decides,
once for the process, whether the build is usable: every listed source must
still be what it was compiled from -- the size and times the manifest
recorded (one ``stat`` each), or else the same SHA-256 -- and every
extension file must be there. Then it loads those extensions instead of the
``.py`` files; otherwise it steps aside: a stale build never runs.
``USTACK_PURE=1``, no build (no compiler at install time) or a stale one:
everything runs interpreted. ``MODE`` says which ("compiled" or "pure") and
``REASON`` why, once decided (``decide()`` forces it); each process logs both
at start.

The build is all or nothing, so compiled and interpreted versions of one
class never meet in a process: the finder decides before the first listed
module loads, and decides "pure" if one was imported before it was there.

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

import _thread
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# Only what the interpreter has loaded already: importing this module (every `import
# pipeline`) must cost nothing. json (and SHA-256) are imported when the build is checked.
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "mypyc")
MANIFEST = os.path.join(BUILD_DIR, "manifest.json")

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
    "workers.tcp.counters",
    "workers.tcp.receiver",
    "workers.tcp.outbox",
    "workers.tcp.sendstate",
    "workers.tcp.recovery",
    "workers.tcp.reno_recovery",
    "workers.tcp.tlp",
    "workers.tcp.sack_recovery",
    "workers.tcp.sender",
    "workers.tcp.connection",
    "workers.tcp.icmp_errors",
    "workers.tcp.encapsulation",
    "workers.tcp.time_wait",
    "workers.tcp.listener",
    "workers.tcp.demux",
)

MODE = "pure"
REASON = "not decided: no listed module imported yet"

# A source changed this close (ns) before scripts/compile read it is checked by its hash
# every time: a later write within the file system's time granularity could leave
# its size and times as they were (git's "racily clean" entries).
RACY_NS = 2_000_000_000


def source_path(module: str, root: str = ROOT) -> str:
    return os.path.join(root, *module.split(".")) + ".py"


def _stamp(st: os.stat_result) -> list[int]:
    # The change time too: unlike the modification time, nothing sets it back (cp -p, touch -d).
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _digest(path: str) -> str:
    # CPython's own SHA-256 (what hashlib falls back to), not hashlib's: hashlib loads the OpenSSL
    # bindings, ~1 MB of every process for as long as it runs, whenever a source's stamp has moved
    # (a checkout after scripts/install) and every process of the stack hashes the sources.
    try:
        from _sha2 import sha256  # Python 3.12 on
    except ImportError:
        from _sha256 import sha256  # type: ignore[no-redef]

    with open(path, "rb") as f:
        return sha256(f.read()).hexdigest()


def record_sources(root: str = ROOT, racy_ns: int = RACY_NS) -> tuple[dict[str, str], dict[str, list[int]]]:
    """For the manifest: the SHA-256 of each listed source, and its size and times where they vouch for it."""
    import time

    hashes: dict[str, str] = {}
    stamps: dict[str, list[int]] = {}
    for module in MODULES:
        path = source_path(module, root)
        start = time.time_ns()
        before = os.stat(path)
        hashes[module] = _digest(path)
        after = os.stat(path)
        if _stamp(before) == _stamp(after) and max(after.st_mtime_ns, after.st_ctime_ns) < start - racy_ns:
            stamps[module] = _stamp(after)
    return hashes, stamps


def _unchanged(path: str, digest: str, stamp: list[int] | None) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _stamp(st) == stamp or _digest(path) == digest


def check_build(build_dir: str = BUILD_DIR, root: str = ROOT) -> tuple[dict[str, str] | None, str]:
    """The extension file of each module (and of mypyc's shared module) if the build matches the sources,
    else why not."""
    import json

    try:
        with open(os.path.join(build_dir, "manifest.json"), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        return None, "no compiled build (scripts/install builds one when gcc is there)"
    if manifest.get("abi") != importlib.machinery.EXTENSION_SUFFIXES[0]:
        return None, "build is for another Python"
    hashes, stamps = manifest.get("sources", {}), manifest.get("stamps", {})
    if hashes.keys() != set(MODULES):
        return None, "build is stale (the list of compiled modules changed since scripts/install)"
    for module in MODULES:
        if not _unchanged(source_path(module, root), hashes[module], stamps.get(module)):
            return None, f"build is stale ({module} changed since scripts/install)"
    files = {name: os.path.join(build_dir, rel) for name, rel in manifest.get("files", {}).items()}
    if not set(MODULES) <= files.keys() or not all(os.path.isfile(f) for f in files.values()):
        return None, "build is incomplete"
    return files, "build matches the sources"


class _ExtensionFinder:
    """First on sys.meta_path: decides at the first listed import, then finds the listed modules
    (and mypyc's shared runtime module) in the build, or nothing."""

    def __init__(self) -> None:
        self.wanted = frozenset(MODULES)  # before the decision; after it, what the build holds
        self.files: dict[str, str] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.wanted:
            return None
        decide()
        so = self.files.get(fullname)
        if so is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, importlib.machinery.ExtensionFileLoader(fullname, so),
                                              origin=so)
        spec.has_location = True
        return spec


_FINDER = _ExtensionFinder()
_DECIDING = _thread.allocate_lock()
_decided = False


def activate() -> None:
    """Load the compiled modules from the first listed import on, if the build is usable then (idempotent;
    reads no file)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def decide() -> None:
    """Decide now, if no listed import has yet, which build this process runs: sets MODE and REASON."""
    global MODE, REASON, _decided
    with _DECIDING:
        if _decided:
            return
        files: dict[str, str] | None = None
        loaded = [m for m in MODULES if m in sys.modules]
        if os.environ.get("USTACK_PURE", "") not in ("", "0"):
            REASON = "USTACK_PURE is set"
        elif _FINDER not in sys.meta_path:
            REASON = "not activated"
        elif loaded:  # too late to swap them: stay consistent
            REASON = f"imported before activation: {loaded}"
        else:
            files, REASON = check_build()
        MODE = "pure" if files is None else "compiled"
        _FINDER.files = files or {}
        _FINDER.wanted = frozenset(_FINDER.files)
        _decided = True


def is_compiled(module: ModuleType) -> bool:
    """True if the module object was loaded from an extension, not from its .py file."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)
