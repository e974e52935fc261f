"""Addresses as text: packed bytes to text for logs and stackctl; the networks a setting lists."""

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def parse_networks(raw: str) -> tuple[Network, ...]:
    """A comma-separated list of addresses and CIDR networks; ValueError naming the bad entry."""
    nets = []
    for item in raw.split(","):
        item = item.strip()
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an address or CIDR network") from None
    return tuple(nets)
