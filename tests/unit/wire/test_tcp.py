"""TCP codec: Linux-shaped SYN / data / SACK segments both ways, every truncation, option
checks, offload partial sums, 64 KB segments, hypothesis round trips and scapy cross-checks."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from pipeline.wire import Malformed
from pipeline.wire.checksum import internet_checksum, pseudo_header_sum
from pipeline.wire.seqnum import MASK
from pipeline.wire.tcp import NO_OPTIONS, Flags, TcpOptions, TcpSegment, parse_tcp

CLIENT = bytes([192, 168, 69, 1])
SERVER = bytes([192, 168, 69, 2])

# SYN as Linux sends it: MSS 1460, SACK-permitted, TS, NOP, WS 7 (40-byte header).
SYN = bytes.fromhex(
    "b71800509a3b5c7100000000a002faf029f30000"
    "020405b40402080aab80be310000000001030307"
)
SYN_SEG = TcpSegment(
    src_port=46872, dst_port=80, seq=0x9A3B5C71, ack=0, flags=Flags.SYN, window=64240,
    options=TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamp=(2877341233, 0)),
)
# A data segment from the server: NOP NOP TS, PSH|ACK, 19 bytes (odd length).
DATA = bytes.fromhex(
    "0050b718112233449a3b5c72801801f63f6e0000"
    "0101080a000003e8ab80be31"
    "485454502f312e3120323030204f4b0d0a0d0a"
)
DATA_SEG = TcpSegment(
    src_port=80, dst_port=46872, seq=0x11223344, ack=0x9A3B5C72, flags=Flags.PSH | Flags.ACK,
    window=502, payload=b"HTTP/1.1 200 OK\r\n\r\n", options=TcpOptions(timestamp=(1000, 2877341233)),
)
# A pure ACK with TS and two SACK blocks.
SACK = bytes.fromhex(
    "b71800509a3b5c7211223357d01001f5f7c50000"
    "0101080aab80be74000003e8"
    "010105121122500011225b481122600011226b48"
)
SACK_SEG = TcpSegment(
    src_port=46872, dst_port=80, seq=0x9A3B5C72, ack=0x11223357, flags=Flags.ACK, window=501,
    options=TcpOptions(
        timestamp=(2877341300, 1000),
        sack_blocks=((0x11225000, 0x11225B48), (0x11226000, 0x11226B48)),
    ),
)
KNOWN = [(SYN, SYN_SEG, CLIENT, SERVER), (DATA, DATA_SEG, SERVER, CLIENT), (SACK, SACK_SEG, CLIENT, SERVER)]


def ip(addr: bytes) -> str:
    return ".".join(map(str, addr))


def with_options(opts: bytes, payload: bytes = b"", flags: int = 0x10) -> bytes:
    """A segment (checksum left zero) carrying the given raw option bytes."""
    assert len(opts) % 4 == 0
    head = bytes.fromhex("30390050000000010000000200") + bytes([flags]) + b"\x10\x00\x00\x00\x00\x00"
    head = head[:12] + bytes([((20 + len(opts)) // 4) << 4]) + head[13:]
    return head + opts + payload


def parse_opts(opts: bytes) -> TcpOptions:
    return parse_tcp(with_options(opts), CLIENT, SERVER, verify_checksum=False).options


# -- known bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_deconstruct(wire, seg, src, dst):
    got = parse_tcp(wire, src, dst)
    assert got == seg
    assert type(got.seq) is int and type(got.ack) is int and type(got.flags) is Flags
    assert all(type(e) is int for block in got.options.sack_blocks for e in block)


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_construct(wire, seg, src, dst):
    assert seg.emit(src, dst) == wire
    assert seg.header_len == len(wire) - len(seg.payload)


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_parse_from_view_inside_larger_buffer(wire, seg, src, dst):
    # As handed over by parse_ipv4: a slice of a buffer whose other bytes are junk.
    buf = bytearray(b"\xa5" * 20 + wire + b"\xa5" * 20)
    assert parse_tcp(memoryview(buf)[20 : 20 + len(wire)], src, dst) == seg


def test_properties():
    assert (SYN_SEG.syn, SYN_SEG.fin, SYN_SEG.rst, SYN_SEG.ack_flag, SYN_SEG.psh) == (True, False, False, False, False)
    assert SYN_SEG.seg_len == 1 and SYN_SEG.header_len == 40
    assert (DATA_SEG.syn, DATA_SEG.ack_flag, DATA_SEG.psh) == (False, True, True)
    assert DATA_SEG.seg_len == 19 and DATA_SEG.header_len == 32
    assert SACK_SEG.seg_len == 0
    fin = TcpSegment(1, 2, 0, 0, Flags.SYN | Flags.FIN | Flags.RST, 0, b"xyz")
    assert fin.seg_len == 5 and fin.fin and fin.rst
    assert TcpSegment(1, 2, 0, 0, Flags.ACK, 0).header_len == 20


def test_every_flag_byte():
    for b in range(256):
        wire = with_options(b"", flags=b)
        seg = parse_tcp(wire, CLIENT, SERVER, verify_checksum=False)
        assert int(seg.flags) == b and isinstance(seg.flags, Flags)
        assert seg.emit(CLIENT, SERVER)[13] == b


# -- checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_truncated_at_every_length(wire, seg, src, dst):
    header_len = seg.header_len
    for n in range(len(wire)):
        with pytest.raises(Malformed):
            parse_tcp(wire[:n], src, dst)
        if n < header_len:
            with pytest.raises(Malformed) as e:
                parse_tcp(wire[:n], src, dst, verify_checksum=False)
            assert e.value.reason == ("truncated" if n < 20 else "bad_data_offset")


@pytest.mark.parametrize("offset", [0, 1, 4])
def test_data_offset_too_small(offset):
    bad = bytearray(DATA)
    bad[12] = offset << 4
    with pytest.raises(Malformed) as e:
        parse_tcp(bytes(bad), SERVER, CLIENT, verify_checksum=False)
    assert e.value.reason == "bad_data_offset"


def test_data_offset_past_buffer():
    bad = bytearray(SYN)
    bad[12] = 0xF0  # 60 bytes claimed, 40 present
    with pytest.raises(Malformed) as e:
        parse_tcp(bytes(bad), CLIENT, SERVER, verify_checksum=False)
    assert e.value.reason == "bad_data_offset"


def test_bad_checksum():
    for i in (0, 16, 17, 25, len(DATA) - 1):
        bad = bytearray(DATA)
        bad[i] ^= 0x04
        with pytest.raises(Malformed) as e:
            parse_tcp(bytes(bad), SERVER, CLIENT)
        assert e.value.reason == "bad_checksum"


def test_checksum_covers_pseudo_header():
    with pytest.raises(Malformed) as e:
        parse_tcp(DATA, SERVER, bytes([192, 168, 69, 3]))
    assert e.value.reason == "bad_checksum"
    assert parse_tcp(DATA, SERVER, bytes([192, 168, 69, 3]), verify_checksum=False) == DATA_SEG


@pytest.mark.parametrize(
    "opts",
    [
        "02000000",  # length 0
        "02010000",  # length 1
        "0101010f",  # kind 15 with no length byte left
        "0203050000000000",  # MSS length 3
        "020505b400000000",  # MSS length 5
        "03040700",  # WS length 4
        "03020000",  # WS length 2
        "04030000",  # SACK-permitted length 3
        "01010502",  # SACK with no block
        "0101050900000000000000000000000000",  # SACK length 9 (padded row)
        "0101050e0000000100000002000000030000",  # SACK length 14: not a whole block
        "080900000001000000020000",  # TS length 9
        "080b000000010000000200000000",  # TS length 11
        "01011e08000000",  # unknown kind running past the header
        "fe2a0000",  # unknown kind, length 42
    ],
)
def test_bad_options(opts):
    raw = bytes.fromhex(opts)
    raw += b"\x00" * (-len(raw) % 4)
    with pytest.raises(Malformed) as e:
        parse_opts(raw)
    assert e.value.reason == "bad_option"


def test_unknown_options_skipped():
    # TFO cookie (kind 34) and an experimental kind 254 around an MSS.
    raw = bytes.fromhex("2206a1b2c3d4" "020405b4" "fe04abcd" "0101")
    assert parse_opts(raw) == TcpOptions(mss=1460)


def test_eol_ends_the_list():
    # Bytes after EOL are padding, even if they would not parse.
    assert parse_opts(bytes.fromhex("020405b400ff0102")) == TcpOptions(mss=1460)
    assert parse_opts(bytes.fromhex("00000000")) is NO_OPTIONS


def test_nop_only_is_no_options():
    assert parse_opts(b"\x01" * 8) is NO_OPTIONS


def test_window_scale_kept_raw():
    # RFC 7323 §2.3: values above 14 are clamped by the receiver, not the codec.
    assert parse_opts(bytes.fromhex("01030320")).window_scale == 32


def test_four_sack_blocks_without_timestamps():
    edges = [(0xFFFFFFF0 + 8 * i) & MASK for i in range(8)]  # wraps past 2**32
    blocks = tuple(zip(edges[::2], edges[1::2]))
    seg = TcpSegment(1, 2, 0, 0, Flags.ACK, 0, options=TcpOptions(sack_blocks=blocks))
    wire = seg.emit(CLIENT, SERVER)
    assert len(wire) == 20 + 36 == seg.header_len
    assert parse_tcp(wire, CLIENT, SERVER) == seg


@pytest.mark.parametrize(
    "opts, fits",
    [
        (TcpOptions(), 4),
        (TcpOptions(timestamp=(1, 2)), 3),
        (TcpOptions(timestamp=(1, 2), window_scale=1), 2),
        (TcpOptions(mss=1, sack_permitted=True, timestamp=(1, 2), window_scale=1), 2),
        (TcpOptions(mss=1, sack_permitted=True, window_scale=1), 3),
    ],
)
def test_sack_blocks_cut_to_what_fits(opts, fits):
    blocks = tuple((10 * i, 10 * i + 5) for i in range(6))
    o = TcpOptions(opts.mss, opts.window_scale, opts.sack_permitted, blocks, opts.timestamp)
    seg = TcpSegment(1, 2, 0, 0, Flags.ACK, 0, options=o)
    wire = seg.emit(CLIENT, SERVER)
    assert len(wire) == seg.header_len <= 60
    got = parse_tcp(wire, CLIENT, SERVER).options
    assert got.sack_blocks == blocks[:fits]  # the first (most recent) blocks kept, RFC 2018 §4


# -- large segments and offload ---------------------------------------------------------------


def test_64k_segment():
    payload = os.urandom(65535 - 20 - 32)
    seg = TcpSegment(80, 46872, 0xFFFF0000, 7, Flags.ACK, 65535, payload, DATA_SEG.options)
    wire = seg.emit(SERVER, CLIENT)
    assert len(wire) == 65535 - 20
    assert parse_tcp(wire, SERVER, CLIENT) == seg
    assert TCP(wire).chksum == bytes_checksum_by_scapy(wire, SERVER, CLIENT)


def bytes_checksum_by_scapy(wire: bytes, src: bytes, dst: bytes) -> int:
    rebuilt = IP(bytes(IP(src=ip(src), dst=ip(dst)) / TCP(wire)))
    tcp = rebuilt[TCP]
    del tcp.chksum
    return IP(bytes(rebuilt))[TCP].chksum


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_emit_without_checksum_leaves_pseudo_header_sum(wire, seg, src, dst):
    partial = seg.emit(src, dst, checksum=False)
    # csum_offset 16 holds the folded pseudo-header sum, as Linux's NEEDS_CSUM expects.
    assert int.from_bytes(partial[16:18], "big") == pseudo_header_sum(src, dst, 6, len(wire))
    assert partial[:16] == wire[:16] and partial[18:] == wire[18:]
    # What the device does: checksum from csum_start over the rest, stored at csum_offset.
    done = partial[:16] + internet_checksum(partial).to_bytes(2, "big") + partial[18:]
    assert done == wire


# -- properties -------------------------------------------------------------------------------

seqnums = st.integers(0, 0xFFFFFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def tcp_options(draw):
    mss = draw(st.none() | st.integers(0, 0xFFFF))
    ws = draw(st.none() | st.integers(0, 255))
    sack_permitted = draw(st.booleans())
    ts = draw(st.none() | st.tuples(u32, u32))
    used = (4 if mss is not None else 0) + (12 if ts else 4 if sack_permitted else 0) + (4 if ws is not None else 0)
    room = max(0, (40 - used - 4) // 8)
    blocks = tuple(draw(st.lists(st.tuples(seqnums, seqnums), max_size=room)))
    o = TcpOptions(mss, ws, sack_permitted, blocks, ts)
    return NO_OPTIONS if o == NO_OPTIONS else o


segments = st.builds(
    TcpSegment,
    src_port=st.integers(0, 0xFFFF),
    dst_port=st.integers(0, 0xFFFF),
    seq=seqnums,
    ack=seqnums,
    flags=st.integers(0, 255).map(Flags),
    window=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=200),
    options=tcp_options(),
    urgent=st.integers(0, 0xFFFF),
)
addrs = st.binary(min_size=4, max_size=4)


@given(segments, addrs, addrs)
def test_round_trip(seg, src, dst):
    wire = seg.emit(src, dst)
    assert len(wire) == seg.header_len + len(seg.payload)
    assert parse_tcp(wire, src, dst) == seg


@given(segments, addrs, addrs, st.booleans())
def test_the_header_alone_is_the_segment_without_its_payload(seg, src, dst, checksum):
    header = seg.emit_header(src, dst, checksum=checksum)
    assert header + seg.payload == seg.emit(src, dst, checksum=checksum)


@given(st.binary(max_size=80), addrs, addrs)
def test_random_bytes_only_raise_malformed(data, src, dst):
    for verify_checksum in (True, False):
        try:
            parse_tcp(data, src, dst, verify_checksum=verify_checksum)
        except Malformed:
            pass


@given(st.binary(max_size=40).map(lambda b: b + b"\x01" * (-len(b) % 4)))
def test_random_options_only_raise_malformed(opts):
    try:
        parse_opts(opts)
    except Malformed:
        pass


@given(st.sampled_from(KNOWN), st.lists(st.tuples(st.integers(0, 59), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_segments_only_raise_malformed(known, edits):
    wire = bytearray(known[0])
    for i, v in edits:
        if i < len(wire):
            wire[i] = v
    try:
        parse_tcp(bytes(wire), known[2], known[3], verify_checksum=False)
    except Malformed:
        pass


def scapy_options(o: TcpOptions) -> list:
    out: list = []
    if o.mss is not None:
        out.append(("MSS", o.mss))
    if o.window_scale is not None:
        out.append(("WScale", o.window_scale))
    if o.sack_permitted:
        out.append(("SAckOK", b""))
    if o.timestamp is not None:
        out.append(("Timestamp", o.timestamp))
    if o.sack_blocks:
        out.append(("SAck", tuple(int(e) for block in o.sack_blocks for e in block)))
    return out


def options_from_scapy(opts: list) -> TcpOptions:
    d = dict((name, value) for name, value in opts if name not in ("NOP", "EOL"))
    sack = d.get("SAck", ())
    return TcpOptions(
        mss=d.get("MSS"),
        window_scale=d.get("WScale"),
        sack_permitted="SAckOK" in d,
        sack_blocks=tuple((sack[i], sack[i + 1]) for i in range(0, len(sack), 2)),
        timestamp=tuple(d["Timestamp"]) if "Timestamp" in d else None,
    )


@given(segments, addrs, addrs)
def test_scapy_parses_what_we_emit(seg, src, dst):
    wire = seg.emit(src, dst)
    pkt = IP(bytes(IP(src=ip(src), dst=ip(dst), proto=6) / TCP(wire)))
    tcp = pkt[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (seg.src_port, seg.dst_port, int(seg.seq), int(seg.ack))
    assert (int(tcp.flags), tcp.window, tcp.urgptr, tcp.dataofs * 4) == (
        int(seg.flags), seg.window, seg.urgent, seg.header_len
    )
    assert options_from_scapy(tcp.options) == seg.options
    assert bytes(tcp.payload) == seg.payload
    del tcp.chksum  # scapy recomputes it: it must agree with ours
    assert IP(bytes(pkt))[TCP].chksum == int.from_bytes(wire[16:18], "big")


@given(segments, addrs, addrs, st.randoms(use_true_random=False))
def test_we_parse_what_scapy_builds(seg, src, dst, rnd):
    # scapy lays options out its own way (any order, EOL padding): we must not care.
    opts = scapy_options(seg.options)
    rnd.shuffle(opts)
    pkt = IP(src=ip(src), dst=ip(dst)) / TCP(
        sport=seg.src_port, dport=seg.dst_port, seq=int(seg.seq), ack=int(seg.ack), flags=int(seg.flags),
        window=seg.window, urgptr=seg.urgent, options=opts,
    ) / seg.payload
    wire = bytes(IP(bytes(pkt))[TCP])
    assert parse_tcp(wire, src, dst) == seg
