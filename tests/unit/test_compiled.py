"""The compiled build against the same source interpreted: same inputs, same outputs.

Each test loads a module a second time from its ``.py`` file (``pure()``),
runs it and the module the process imported (compiled by mypyc unless
USTACK_PURE=1) on the same inputs, and compares what comes out: bytes,
parsed values (made comparable by ``canon``), drop reasons and state after a
sequence of operations. ``scripts/test`` runs this file only against the
compiled build; the interpreted run of the unit tests leaves it out, since
there both sides would be the same code.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import importlib.machinery
import json
import os
import pathlib
import struct
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment

from pipeline import compiled
from pipeline.wire import Malformed
from pipeline.wire.seqnum import seq_add, seq_le

FEW = settings(max_examples=60, deadline=None)
SRC, DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6, DST6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
_pure_cache: dict[str, types.ModuleType] = {}


def pure(name: str) -> types.ModuleType:
    """The module ``name`` executed from its .py file, importing the other listed modules interpreted too."""
    if not _pure_cache:
        _load_pure()
    return _pure_cache[name]


def _load_pure() -> None:
    # First everything as the process runs it, so that modules outside the
    # list are imported once, from the build; then, for a moment, the listed
    # modules are imported again from source with sys.modules, the package
    # attributes and the import finder put back afterwards.
    for name in compiled.MODULES:
        importlib.import_module(name)
    saved = {name: sys.modules.pop(name) for name in compiled.MODULES}
    finders = [f for f in sys.meta_path if isinstance(f, compiled._ExtensionFinder)]
    for f in finders:
        sys.meta_path.remove(f)
    try:
        for name in compiled.MODULES:
            importlib.import_module(name)
        _pure_cache.update((name, sys.modules.pop(name)) for name in compiled.MODULES)
    finally:
        sys.meta_path[:0] = finders
        for name, module in saved.items():
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)


def both(name: str) -> tuple[types.ModuleType, types.ModuleType]:
    """(the module as the process runs it, the same module interpreted)."""
    return importlib.import_module(name), pure(name)


def same_on_both(run, *names: str) -> None:
    """run(*modules) gives the same result with the modules as the process runs them and interpreted."""
    assert run(*[importlib.import_module(n) for n in names]) == run(*[pure(n) for n in names])


def canon(value: object) -> object:
    """A value both builds produce equal when they mean the same (class identity aside)."""
    if isinstance(value, enum.Enum):
        return (type(value).__name__, value.value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, tuple(canon(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__ if type(value) in (list, tuple) else "named", tuple(canon(v) for v in value))
    if isinstance(value, dict):
        return {canon(k): canon(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if hasattr(value, "__slots__") or hasattr(value, "__dict__"):  # a plain class: its attributes
        names = sorted(set(getattr(value, "__dict__", {})) | set(_slots(type(value))))
        return (type(value).__name__, tuple((n, canon(getattr(value, n))) for n in names if hasattr(value, n)))
    raise TypeError(f"canon: {type(value)}")


def _slots(cls: type) -> list[str]:
    return [s for c in cls.__mro__ for s in getattr(c, "__slots__", ())]


def outcome(fn, *args) -> object:
    """What a call gives: its canonical result, or the drop reason / error it raised."""
    try:
        return ("ok", canon(fn(*args)))
    except Malformed as exc:
        return ("malformed", exc.reason)
    except (ValueError, TypeError, struct.error, OverflowError) as exc:
        return ("error", type(exc).__name__)


def mutations(data: bytes, draw) -> bytes:
    """data unchanged, truncated, or with one byte changed."""
    how = draw(st.sampled_from(["same", "truncate", "flip"]))
    if how == "truncate" or not data:
        return data[:draw(st.integers(0, len(data)))]
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    return data


# -- the build itself ------------------------------------------------------------------------


def test_every_listed_module_runs_compiled():
    assert os.environ.get("USTACK_PURE", "") in ("", "0"), "this file compares builds; run it compiled"
    assert compiled.MODE == "compiled", f"no compiled build: {compiled.REASON} (scripts/install builds it)"
    for name in compiled.MODULES:
        assert compiled.is_compiled(importlib.import_module(name)), name
        assert not compiled.is_compiled(pure(name)), name


def _in_a_process(code: str) -> dict:
    """What ``code`` (which ends by printing JSON) prints, run by a fresh interpreter here, built as this one."""
    env = {k: v for k, v in os.environ.items() if k != "USTACK_PURE"}
    run = subprocess.run([sys.executable, "-c", code], cwd=compiled.ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(run.stdout)


def test_importing_pipeline_reads_nothing_and_the_first_hot_import_decides():
    seen = _in_a_process(
        "import json, sys\n"
        "opened = []\n"
        "sys.addaudithook(lambda event, args: event == 'open' and opened.append(str(args[0])))\n"
        "import pipeline\n"
        "from pipeline import compiled\n"
        "before = (compiled.REASON, opened[:])\n"
        "import pipeline.wire.seqnum\n"
        "print(json.dumps({'before': before, 'after': (compiled.MODE, compiled.REASON), 'opened': opened,\n"
        "                  'compiled': compiled.is_compiled(pipeline.wire.seqnum)}))\n")
    reason, opened = seen["before"]
    assert reason == "not decided: no listed module imported yet"
    assert not [p for p in opened if "manifest" in p or p.endswith("seqnum.py")]
    assert seen["after"] == ["compiled", "build matches the sources"] and seen["compiled"]
    # Only the sources whose size and times cannot vouch for them are read (hashed).
    stamps = json.loads(pathlib.Path(compiled.MANIFEST).read_text())["stamps"]
    sources = {compiled.source_path(name): name for name in compiled.MODULES}
    unvouched = {path for path, name in sources.items() if stamps.get(name) != compiled._stamp(os.stat(path))}
    assert {p for p in seen["opened"] if p in sources} == unvouched


def test_a_hot_module_imported_before_activation_keeps_the_whole_process_interpreted():
    seen = _in_a_process(
        "import json, sys\n"
        "from pipeline import compiled\n"
        "sys.meta_path.remove(compiled._FINDER)\n"
        "import pipeline.wire.seqnum\n"
        "compiled.activate()\n"
        "import pipeline.wire.checksum\n"
        "print(json.dumps([compiled.MODE, compiled.REASON, compiled.is_compiled(pipeline.wire.checksum)]))\n")
    assert seen == ["pure", "imported before activation: ['pipeline.wire.seqnum']", False]


def _fake_build(tmp_path: pathlib.Path, racy_ns: int = 0) -> tuple[str, str]:
    """Every listed source in a tree of its own and a build of them (empty extension files): (root, build)."""
    root, build = tmp_path / "src", tmp_path / "build"
    for name in compiled.MODULES:
        path = pathlib.Path(compiled.source_path(name, str(root)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\n")
    hashes, stamps = compiled.record_sources(str(root), racy_ns)
    files = {name: name + ".so" for name in (*compiled.MODULES, "ustack__mypyc")}
    build.mkdir()
    for rel in files.values():
        (build / rel).write_bytes(b"")
    (build / "manifest.json").write_text(json.dumps({
        "abi": importlib.machinery.EXTENSION_SUFFIXES[0], "sources": hashes, "stamps": stamps, "files": files}))
    return str(root), str(build)


def test_a_build_is_checked_by_each_source_s_size_and_times(tmp_path, monkeypatch):
    root, build = _fake_build(tmp_path)
    monkeypatch.setattr(compiled, "_digest", lambda path: pytest.fail(f"hashed {path}"))
    files, why = compiled.check_build(build, root)
    assert why == "build matches the sources" and files is not None and set(compiled.MODULES) < files.keys()


def test_a_rewritten_source_is_checked_by_its_hash(tmp_path):
    root, build = _fake_build(tmp_path)
    name = compiled.MODULES[3]
    path = pathlib.Path(compiled.source_path(name, root))
    path.write_text(path.read_text())  # the same bytes: new times, same hash
    assert compiled.check_build(build, root)[1] == "build matches the sources"
    st = path.stat()
    path.write_text(path.read_text().upper())  # other bytes, the same size, the times put back
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert compiled.check_build(build, root) == (None, f"build is stale ({name} changed since scripts/install)")


def test_sources_changed_just_before_the_build_are_always_hashed(tmp_path, monkeypatch):
    root, build = _fake_build(tmp_path, racy_ns=compiled.RACY_NS)  # just written: racy
    assert json.loads(pathlib.Path(build, "manifest.json").read_text())["stamps"] == {}
    hashed = []
    digest = compiled._digest
    monkeypatch.setattr(compiled, "_digest", lambda path: hashed.append(path) or digest(path))
    assert compiled.check_build(build, root)[1] == "build matches the sources"
    assert len(hashed) == len(compiled.MODULES)


def test_a_missing_source_or_extension_makes_the_build_unusable(tmp_path):
    root, build = _fake_build(tmp_path)
    os.remove(os.path.join(build, "ustack__mypyc.so"))
    assert compiled.check_build(build, root) == (None, "build is incomplete")
    os.remove(compiled.source_path(compiled.MODULES[0], root))
    assert compiled.check_build(build, root)[0] is None


# -- wire codecs -----------------------------------------------------------------------------


@FEW
@given(st.binary(max_size=3000), st.integers(0, 1 << 40), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF))
def test_checksum(data, initial, csum, old, new):
    fast, slow = both("pipeline.wire.checksum")
    for fn in ("ones_sum", "internet_checksum", "verify"):
        assert getattr(fast, fn)(data, initial) == getattr(slow, fn)(data, initial), fn
        assert getattr(fast, fn)(memoryview(data)) == getattr(slow, fn)(memoryview(data)), fn
    assert fast.update16(csum, old, new) == slow.update16(csum, old, new)
    assert fast.pseudo_header_sum(SRC, DST, 6, len(data)) == slow.pseudo_header_sum(SRC, DST, 6, len(data))
    assert fast.pseudo_header_sum6(SRC6, DST6, 17, len(data)) == slow.pseudo_header_sum6(SRC6, DST6, 17, len(data))


tcp_options = st.lists(st.sampled_from([
    ("MSS", 1460), ("WScale", 7), ("SAckOK", b""), ("Timestamp", (123456, 654321)), ("NOP", None),
    ("SAck", (1000, 2000)), ("SAck", (4294967000, 300)),
]), max_size=4)


@st.composite
def ipv4_packets(draw):
    """IPv4 packets from scapy (an independent encoder), then possibly damaged."""
    payload = draw(st.binary(max_size=200))
    flags = draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA", ""]))
    upper = draw(st.sampled_from([
        TCP(sport=draw(st.integers(1, 65535)), dport=80, seq=draw(st.integers(0, 2**32 - 1)),
            ack=draw(st.integers(0, 2**32 - 1)), flags=flags, window=draw(st.integers(0, 65535)),
            options=draw(tcp_options)) / payload,
        UDP(sport=draw(st.integers(0, 65535)), dport=7) / payload,
        ICMP(type=draw(st.sampled_from([0, 3, 8, 11])), id=draw(st.integers(0, 65535)), seq=1) / payload,
    ]))
    frag = draw(st.sampled_from([0, 0, 0, 1, 185]))
    ip = IP(src="10.0.0.1", dst="10.0.0.2", ttl=draw(st.integers(1, 255)), id=draw(st.integers(0, 65535)),
            flags=draw(st.sampled_from(["", "DF", "MF"])), frag=frag, tos=draw(st.integers(0, 255)))
    return mutations(bytes(ip / upper), draw)


@FEW
@given(ipv4_packets(), st.booleans())
def test_ipv4_tcp_udp(packet, verify):
    checks = [
        ("pipeline.wire.ipv4", lambda m: m.parse_ipv4(packet, verify)),
        ("pipeline.wire.ipv4", lambda m: (lambda h, p: m.build_ipv4(h, bytes(p)))(*m.parse_ipv4(packet, False))),
        ("pipeline.wire.ipv4", lambda m: _view(m.Ipv4Packet.checked(packet, verify))),
        ("pipeline.wire.tcp", lambda m: m.parse_tcp(packet[20:], SRC, DST, verify)),
        ("pipeline.wire.tcp", lambda m: m.parse_tcp(packet[20:], SRC, DST, False).emit(SRC, DST, verify)),
        ("pipeline.wire.tcp", lambda m: _view(m.TcpPacket.checked(packet[20:]))),
        ("pipeline.wire.udp", lambda m: m.parse_udp(packet[20:], SRC, DST, verify)),
        ("pipeline.wire.udp", lambda m: m.parse_udp(packet[20:], SRC, DST, False).emit(SRC, DST)),
        ("pipeline.wire.udp", lambda m: _view(m.UdpPacket.checked(packet[20:]))),
    ]
    for name, call in checks:
        fast, slow = both(name)
        assert outcome(call, fast) == outcome(call, slow), name


def _view(view: object) -> object:
    """The public properties of a wire view, named as the interpreted class declares them."""
    cls = getattr(pure(type(view).__module__), type(view).__name__)
    names = {a for c in cls.__mro__ for a, v in vars(c).items() if isinstance(v, property) and a[0] != "_"}
    return {a: outcome(getattr, view, a) for a in sorted(names)}


@st.composite
def ipv6_packets(draw):
    payload = draw(st.binary(max_size=120))
    upper = draw(st.sampled_from([
        ICMPv6EchoRequest(id=draw(st.integers(0, 65535)), seq=2, data=payload),
        UDP(sport=5, dport=7) / payload,
        TCP(sport=9, dport=80, flags="S", options=draw(tcp_options)),
    ]))
    layers = IPv6(src="fd00::1", dst="fd00::2", hlim=draw(st.integers(1, 255)))
    if draw(st.booleans()):
        layers = layers / IPv6ExtHdrFragment(offset=draw(st.sampled_from([0, 1, 100])), m=draw(st.booleans()),
                                             id=draw(st.integers(0, 2**32 - 1)))
    return mutations(bytes(layers / upper), draw)


@FEW
@given(ipv6_packets(), st.booleans())
def test_ipv6(packet, verify):
    fast6, slow6 = both("pipeline.wire.ipv6")
    assert outcome(fast6.parse, packet) == outcome(slow6.parse, packet)
    assert outcome(lambda: _view(fast6.Ipv6View.checked(packet))) == outcome(lambda: _view(slow6.Ipv6View.checked(packet)))



@st.composite
def icmp_messages(draw):
    """ICMP and ICMPv6 messages (scapy-built, then possibly damaged) and a packet an error quotes."""
    payload = draw(st.binary(max_size=120))
    ident, seq = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    v4 = bytes(ICMP(type=draw(st.sampled_from([0, 3, 8, 11, 12])), code=draw(st.integers(0, 4)), id=ident,
                    seq=seq) / payload)
    v6 = bytes(ICMPv6EchoRequest(id=ident, seq=seq, data=payload))
    quoted = bytes(draw(st.sampled_from([IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=7, dport=40000),
                                         IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40000, seq=9),
                                         IPv6(src="fd00::2", dst="fd00::1") / TCP(sport=80, dport=9)]))
                   / payload)
    return mutations(v4, draw), mutations(v6, draw), mutations(quoted, draw)


@FEW
@given(icmp_messages(), st.booleans())
def test_icmp_and_icmpv6(messages, verify):
    v4, v6, quoted = messages
    checks = [
        ("pipeline.wire.icmp", lambda m: m.parse_icmp(v4)),
        ("pipeline.wire.icmp", lambda m: (lambda msg: (msg.identifier, msg.sequence, msg.next_hop_mtu,
                                                        m.echo_reply(msg).emit()))(m.parse_icmp(v4))),
        ("pipeline.wire.icmp", lambda m: _view(m.IcmpPacket.checked(v4))),
        ("pipeline.wire.icmp", lambda m: m.dest_unreachable(m.PORT_UNREACHABLE, quoted).emit()),
        ("pipeline.wire.icmp", lambda m: m.time_exceeded(m.REASSEMBLY_TIME_EXCEEDED, memoryview(quoted)).emit()),
        ("pipeline.wire.icmp", lambda m: (lambda q: q and (q, q.flow_key, q.tcp_seq))(m.quoted_ipv4(quoted))),
        ("pipeline.wire.icmpv6", lambda m: m.parse(v6, SRC6, DST6, verify)),
        ("pipeline.wire.icmpv6", lambda m: (lambda msg: (msg.identifier, msg.sequence, msg.is_error,
                                                          m.echo_reply(msg).to_bytes(DST6, SRC6),
                                                          m.chatter(msg, SRC6)))(m.parse(v6, SRC6, DST6, False))),
        ("pipeline.wire.icmpv6", lambda m: m.dest_unreachable(m.PORT_UNREACHABLE, quoted).to_bytes(DST6, SRC6)),
        ("pipeline.wire.icmpv6", lambda m: m.error_allowed(quoted, m.DEST_UNREACHABLE, m.PORT_UNREACHABLE)),
        ("pipeline.wire.icmpv6", lambda m: (lambda q: q and (q, q.flow_key))(m.quoted_ipv6(quoted))),
    ]
    for name, call in checks:
        fast, slow = both(name)
        assert outcome(call, fast) == outcome(call, slow), name


# -- fragments, flows, bus messages ---------------------------------------------------------


@FEW
@given(st.binary(min_size=1, max_size=3000), st.integers(68, 1500), st.randoms(use_true_random=False),
       st.integers(0, 3))
def test_fragments(payload, mtu, rnd, dropped):
    fast, slow = both("pipeline.fragments")
    packet = bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=7, flags="") / UDP(sport=1, dport=7) / payload)
    pieces = fast.fragment_ipv4(packet, mtu)
    assert [bytes(p) for p in pieces] == [bytes(p) for p in slow.fragment_ipv4(packet, mtu)]
    pieces = pieces + pieces[:dropped]  # duplicates
    rnd.shuffle(pieces)
    packet6 = bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=7) / payload)
    six = fast.fragment_ipv6(packet6, max(mtu, 1280), 99)
    assert [bytes(p) for p in six] == [bytes(p) for p in slow.fragment_ipv6(packet6, max(mtu, 1280), 99)]

    def run(m, ip6):
        r = m.Reassembler()
        got = [outcome(r.add_ipv4, p, 1.0) for p in pieces]
        got += [outcome(r.add_ipv6, p, ip6.parse(p), 1.5) for p in six]
        return got + [(r.bytes_held, r.datagrams, r.next_deadline(), canon(r.expire(100.0)))]

    same_on_both(run, "pipeline.fragments", "pipeline.wire.ipv6")


@FEW
@given(st.sampled_from([SRC, SRC6]), st.integers(0, 65535), st.integers(0, 65535), st.lists(st.integers(0, 70000)))
def test_flow(remote, rport, lport, junk):
    fast, slow = both("pipeline.flow")
    a, b = fast.Flow(remote, rport, lport), slow.Flow(remote, rport, lport)
    assert a.key == b.key and a.bus() == b.bus()
    assert tuple(fast.Flow.from_key(a.key)) == tuple(slow.Flow.from_key(b.key))
    for item in ([remote, rport, lport], [remote, *junk], junk, [remote.hex(), rport, lport]):
        assert outcome(fast.Flow.from_bus, item) == outcome(slow.Flow.from_bus, item)


@FEW
@given(st.lists(st.binary(max_size=100), max_size=5), st.text(max_size=10), st.integers(0, 2**31),
       st.binary(max_size=30))
def test_bus_messages(packets, name, seq, junk):
    fast, slow = both("pipeline.bus.messages")
    flow = importlib.import_module("pipeline.flow").Flow(SRC, 1, 2)
    encoders = [
        lambda m: m.encode_packets([(p, None) for p in packets]),
        lambda m: m.encode_packets([(memoryview(p), (1, 1, 52, 1460, 20, 16)) for p in packets]),
        lambda m: m.encode_heartbeat(name, "tcp", seq, {"drop_x": seq}),
        lambda m: m.encode_goodbye(name),
        lambda m: m.encode_welcome(seq),
        lambda m: m.encode_flows(name, True, [flow], []),
        lambda m: m.encode_request(name),
        lambda m: m.encode_reply("ok", None, {"n": seq}),
    ]
    for encode in encoders:
        frames_fast, frames_slow = outcome(encode, fast), outcome(encode, slow)
        assert frames_fast == frames_slow
        frames = [bytes(f) for f in encode(fast)]  # as the receiver gets them
        assert outcome(fast.decode, frames) == outcome(slow.decode, frames)
        damaged = frames[:1] + [junk] + frames[2:]
        assert outcome(fast.decode, damaged) == outcome(slow.decode, damaged)


@FEW
@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["S", "S", "A", "SA", "R"]), st.floats(0, 0.3)),
                max_size=80))
def test_admission(ops):
    def run(m, routing):
        known: set[bytes] = set()
        drops: list[str] = []
        counters: collections.Counter[str] = collections.Counter()
        adm = m.Admission(known.__contains__, lambda reason, **f: drops.append(reason), counters,
                          syn_rate=20.0, syn_burst=3, retry_rate=5.0, retry_burst=2, source_rate=5.0, source_burst=2)
        members = importlib.import_module("pipeline.membership").Membership(3.0)
        members.seen("tcp.1", "tcp", 0.0)
        # Routing hands admission the view it checked.
        router = routing.Router(DST, members, lambda reason, **f: None, -routing.SETTLE_TIME)
        now, verdicts = 0.0, []
        for who, flags, dt in ops:
            now += dt
            src = bytes([10, 9, 0, who % 8])
            packet = bytes(IP(src=".".join(map(str, src)), dst="10.0.0.2") /
                           TCP(sport=1000 + who, dport=8000, seq=who * 1000, flags=flags))
            if flags == "A" and who % 3 == 0:
                known.add(importlib.import_module("pipeline.flow").Flow(src, 1000 + who, 8000).key)
            verdicts.append(adm.admit(router.route(packet, now)[3], now))
            adm.forwarded(f"tcp.{who % 2}", who * 40)
            if flags == "R":  # now and then a worker's heartbeat: the SYN rate adapts
                adm.worker_report(f"tcp.{who % 2}", who * 500, now)
        return verdicts, drops, dict(counters), sorted(adm.real), adm.syns.rate, adm.backlogs

    same_on_both(run, "pipeline.admission", "pipeline.routing")


@FEW
@given(st.lists(st.one_of(ipv4_packets(), ipv6_packets()), min_size=1, max_size=12), st.booleans(),
       st.booleans())
def test_routing(packets, as_views, settled):
    def run(m):
        drops: list[str] = []
        members = importlib.import_module("pipeline.membership").Membership(3.0)
        for name, role in (("tcp.1", "tcp"), ("tcp.2", "tcp"), ("udp.1", "udp"), ("icmp.1", "icmp")):
            members.seen(name, role, 0.0)
        router = m.Router(DST, members, lambda reason, **f: drops.append(reason), 0.0, address6=DST6,
                          quiet=lambda reason, **f: drops.append("quiet_" + reason))
        router.update_flows("tcp.2", False, (importlib.import_module("pipeline.flow").Flow(SRC, 80, 9),), ())
        now = m.SETTLE_TIME + 1 if settled else 0.1
        routes = []
        for packet in packets:
            worker, role, out, segment = router.route(memoryview(packet) if as_views else packet, now)
            routes.append((worker, role, bytes(out), None if segment is None else (segment.src, segment.key)))
            if worker is None and role:
                router.hold(role, now, (out, None))
        return routes, drops, {k: list(v) for k, v in router.pending.items()}, router.flows_by_worker()

    same_on_both(run, "pipeline.routing")


# -- TCP helpers: the same operations give the same state ----------------------------------


seqs = st.integers(0, 2**32 - 1)
BASE = 2**32 - 3000  # sequence numbers that wrap during the test


@FEW
@given(st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 1500), st.booleans()), max_size=30))
def test_reassembly(ops):
    def run(m):
        q = m.ReassemblyQueue(8000)
        nxt = BASE
        trace = []
        for off, n, view in ops:
            data = bytes((off + k) & 0xFF for k in range(n))
            q.add(seq_add(BASE, off), memoryview(data) if view else data, nxt)
            got = q.pop(nxt)
            nxt = seq_add(nxt, len(got))
            trace.append((got, q.bytes_held, canon(q.sack_blocks())))
        return trace

    same_on_both(run, "workers.tcp.reassembly")


@FEW
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20000), st.integers(1, 3000)), max_size=30))
def test_scoreboard(ops):
    def run(m):
        sb = m.SackScoreboard()
        una, nxt = BASE, seq_add(BASE, 30000)
        trace = []
        for kind, off, n in ops:
            if kind == 0:
                una = seq_add(una, off // 10)
                sb.advance(una)
            else:
                sb.update([(seq_add(BASE, off), seq_add(BASE, off + n))], una, nxt)
            probe = seq_add(BASE, off)
            trace.append((sb.sacked_bytes, canon(sb.highest_sacked), canon(sb.ranges()), sb.is_sacked(probe),
                          canon(sb.next_hole(una, nxt)), sb.sacked_above(probe), sb.sacked_below(probe),
                          sb.covers(una, probe)))
        return trace

    same_on_both(run, "workers.tcp.scoreboard")


@FEW
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0.0001, 3.0), st.integers(1, 100000)), max_size=40),
       st.sampled_from(["newreno", "cubic"]))
def test_rtt_and_congestion(ops, algorithm):
    def run(rtt_m, cc_m):
        est = rtt_m.RttEstimator()
        cc = cc_m.make_congestion_control(algorithm, 1460)
        now, trace = 0.0, []
        for kind, t, n in ops:
            now += t
            [lambda: est.sample(t), est.backoff, lambda: cc.on_ack(n, now, est.srtt),
             lambda: cc.on_loss(n, now), lambda: cc.on_rto(n, now)][kind]()
            if kind == 3:
                cc.on_recovery_exit(now + 0.01)
            trace.append((est.rto, est.srtt, cc.cwnd, cc.ssthresh))
        return trace

    same_on_both(run, "workers.tcp.rtt", "workers.tcp.congestion")


@FEW
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.floats(0.0001, 0.2)), max_size=40))
def test_rack(ops):
    mss = 1000

    def run(m, sbm):
        rack, sb = m.Rack(BASE), sbm.SackScoreboard()
        una, nxt, now, trace = BASE, BASE, 0.0, []
        for kind, k, dt in ops:
            now += dt
            if kind == 0:  # send (or resend) one segment
                start = nxt if k % 2 else una
                rack.on_send(start, seq_add(start, mss), now, start != nxt)
                nxt = seq_add(nxt, mss) if start == nxt else nxt
            elif kind == 1 and nxt != una:  # a SACK for a later segment, or a cumulative ACK
                block = (seq_add(una, mss * (k % 4 + 1)), seq_add(una, mss * (k % 4 + 2)))
                old = una
                if k % 3 == 0:
                    una = seq_add(una, mss)
                blocks = (block,) if seq_le(block[1], nxt) else ()
                sb.update(list(blocks), una, nxt)
                sb.advance(una)
                rack.advance(una)
                rack.on_ack(una, old, blocks, sb, None, now)
            elif kind == 2:
                rack.rtt_sample(dt)
            reo = rack.reo_wnd(kind == 3, sb.sacked_bytes, mss, dt)
            trace.append((reo, canon(rack.detect(sb, reo, now)), canon(rack.lost_below())))
        return trace

    same_on_both(run, "workers.tcp.rack", "workers.tcp.scoreboard")


# -- sequence numbers and the whole TCP core ----------------------------------------------


@FEW
@given(seqs, seqs, st.integers(-(2**31), 2**31))
def test_seqnum(a, b, n):
    fast, slow = both("pipeline.wire.seqnum")
    for fn in ("seq_sub", "seq_lt", "seq_le", "seq_gt", "seq_ge", "seq_max", "seq_min"):
        assert getattr(fast, fn)(a, b) == getattr(slow, fn)(a, b), fn
    assert fast.seq_add(a, n) == slow.seq_add(a, n)
    assert fast.seq_in_window(a, b, abs(n)) == slow.seq_in_window(a, b, abs(n))



def _tcp_script(pure_build: bool, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "USTACK_PURE"}
    if pure_build:
        env["USTACK_PURE"] = "1"
    run = subprocess.run([sys.executable, "-m", "tests.unit.tcp_script", str(n)], cwd=compiled.ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(run.stdout)


def test_tcp_core_scripts():
    """The TCP core end to end (tests/unit/tcp_script.py): a client connection and the demultiplexer
    with its services, handshake, data both ways, loss, repair and close, ISNs near the wrap.  The
    same seeds give the same packets on the wire, data, states and counters in both builds."""
    fast, slow = _tcp_script(False, 60), _tcp_script(True, 60)
    assert (fast["mode"], slow["mode"]) == ("compiled", "pure")
    for seed, (a, b) in enumerate(zip(fast["runs"], slow["runs"], strict=True)):
        assert a == b, f"scenario {seed}"
    # The scenarios exercise what they claim to.
    runs = fast["runs"]
    assert all(r["state"] == "CLOSED" for r in runs)
    assert sum(r["client"]["retransmissions"] > 0 for r in runs) >= 5
    assert sum(r["got_len"] >= 40000 for r in runs) >= 5
