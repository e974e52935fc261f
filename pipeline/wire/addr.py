"""Addresses for people: packed bytes to text, only on log paths."""

import ipaddress


def fmt_addr(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))
