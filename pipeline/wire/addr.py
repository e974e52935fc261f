"""Addresses for people: packed bytes to text, only on log paths."""

import ipaddress


def fmt_addr(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def fmt_endpoint(packed: bytes, port: int) -> str:
    """address:port, with the IPv6 address in brackets (RFC 3986 §3.2.2)."""
    text = fmt_addr(packed)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
