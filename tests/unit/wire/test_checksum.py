"""RFC 1071 checksum and RFC 1624 update against a slow word-by-word reference."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from pipeline.wire.checksum import internet_checksum, ones_sum, pseudo_header_sum, update16, verify


def ref_ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 §4.1, literally: 16-bit words, end-around carry."""
    if len(data) % 2:
        data = data + b"\x00"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_rfc1071_numerical_example():
    # RFC 1071 §3: the bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_ipv4_header_example():
    # A real header (from a ping); its stored checksum is 0x7065.
    header = bytes.fromhex("45000054beef400040017065c0a84501c0a84502")
    assert verify(header)
    zeroed = header[:10] + b"\x00\x00" + header[12:]
    assert internet_checksum(zeroed) == 0x7065


def test_odd_length_is_zero_padded():
    assert ones_sum(b"\xab") == 0xAB00
    assert ones_sum(b"\x12\x34\x56") == 0x1234 + 0x5600
    assert internet_checksum(b"\x12\x34\x56") == ~(0x1234 + 0x5600) & 0xFFFF


def test_zero_and_all_ones_corners():
    assert ones_sum(b"") == 0
    assert ones_sum(b"\x00\x00\x00\x00") == 0
    assert internet_checksum(b"\x00\x00") == 0xFFFF
    # A non-zero sum that is 0 mod 0xFFFF is "negative zero", 0xFFFF.
    assert ones_sum(b"\xff\xff") == 0xFFFF
    assert ones_sum(b"\x80\x00\x7f\xff") == 0xFFFF
    assert internet_checksum(b"\xff\xff") == 0
    assert verify(b"\xff\xff")
    assert not verify(b"\x00\x00")
    assert not verify(b"")


def test_memoryview_slices():
    buf = bytearray(b"\xa5" * 10) + bytes.fromhex("0001f203f4f5f6f7") + bytearray(b"\xa5" * 10)
    assert internet_checksum(memoryview(buf)[10:18]) == 0x220D


@given(st.binary(max_size=300), st.integers(0, 0x3FFFF))
def test_matches_reference(data, initial):
    assert ones_sum(data, initial) == ref_ones_sum(data, initial)
    assert internet_checksum(data, initial) == ~ref_ones_sum(data, initial) & 0xFFFF


def test_large_buffers_match_reference():
    # Lengths around the folding threshold and the 64 KB TSO size, odd and even.
    for n in (4095, 4096, 4097, 8191, 32768, 65535, 65536):
        data = os.urandom(n)
        assert ones_sum(data) == ref_ones_sum(data), n
        assert ones_sum(memoryview(data)) == ref_ones_sum(data), n
    assert ones_sum(b"\xff" * 65536) == 0xFFFF
    assert ones_sum(b"\x00" * 65536) == 0


@given(st.binary(max_size=200).map(lambda b: b[: len(b) & ~1]))
def test_filled_checksum_verifies(data):
    # A sum and its complement add to 0xFFFF, so an appended checksum verifies.
    assert verify(data + internet_checksum(data).to_bytes(2, "big"))


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_pseudo_header_sum(src, dst, protocol, length):
    pseudo = src + dst + bytes([0, protocol]) + length.to_bytes(2, "big")
    assert pseudo_header_sum(src, dst, protocol, length) == ref_ones_sum(pseudo)


@given(st.binary(min_size=2, max_size=60).filter(lambda b: len(b) % 2 == 0), st.data())
def test_update16_matches_recompute(data, draw):
    # RFC 1624 §3: changing one 16-bit word and updating gives a checksum that verifies.
    i = draw.draw(st.integers(0, len(data) // 2 - 1)) * 2
    new = draw.draw(st.integers(0, 0xFFFF))
    old = int.from_bytes(data[i : i + 2], "big")
    csum = internet_checksum(data)
    changed = data[:i] + new.to_bytes(2, "big") + data[i + 2 :]
    updated = update16(csum, old, new)
    # Only all-zero data may differ, as +0 vs -0 (RFC 1624 §5).
    assert updated == internet_checksum(changed) or not any(changed)


def test_update16_known():
    # TTL 64 -> 63 in the ping header above: the TTL/protocol word 0x4001 -> 0x3f01.
    header = bytearray.fromhex("45000054beef400040017065c0a84501c0a84502")
    new_csum = update16(0x7065, 0x4001, 0x3F01)
    header[8] = 63
    header[10:12] = b"\x00\x00"
    assert new_csum == internet_checksum(bytes(header))


def ref_pseudo_header6(src: bytes, dst: bytes, next_header: int, upper_len: int) -> bytes:
    """RFC 8200 §8.1 figure: source, destination, 32-bit length, 3 zero bytes, next header."""
    return src + dst + upper_len.to_bytes(4, "big") + b"\x00\x00\x00" + bytes([next_header])


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(0, 255),
       st.integers(0, 0xFFFFFFFF))
def test_pseudo_header6_matches_reference(src, dst, next_header, upper_len):
    from pipeline.wire.checksum import pseudo_header_sum6

    assert pseudo_header_sum6(src, dst, next_header, upper_len) == ref_ones_sum(
        ref_pseudo_header6(src, dst, next_header, upper_len))


def test_pseudo_header6_against_scapy():
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6

    from pipeline.wire.checksum import pseudo_header_sum6

    pkt = IPv6(bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5353, dport=8000) / b"hello v6"))
    udp = bytes(pkt[UDP])
    src, dst = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
    assert verify(udp, pseudo_header_sum6(src, dst, 17, len(udp)))
    zeroed = udp[:6] + b"\x00\x00" + udp[8:]
    assert internet_checksum(zeroed, pseudo_header_sum6(src, dst, 17, len(udp))) == pkt[UDP].chksum
