"""Addresses for people: packed bytes to text, only on log paths."""

import ipaddress


def fmt_addr(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def fmt_endpoint(packed: bytes, port: int) -> str:
    """address:port, with the IPv6 address in brackets (RFC 3986 §3.2.2)."""
    text = fmt_addr(packed)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def split_endpoint(text: str) -> tuple[str, str]:
    """'10.0.0.1:80', '[fd00::1]:80', an address alone or ':80' -> (address, port), either may be ''.

    An IPv6 address with a port needs its brackets (RFC 3986 §3.2.2); without
    them every colon belongs to the address.
    """
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
        return addr, rest[1:]
    if text.count(":") > 1:
        return text, ""
    addr, sep, port = text.rpartition(":")
    return (addr, port) if sep else (text, "")
