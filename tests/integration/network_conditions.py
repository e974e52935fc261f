"""Loss and bottlenecks on the path between a client namespace and the stack.

The client reaches the stack through the stack's namespace acting as a
router (see ``netns.routed_client``), and every condition applies to
*forwarded* packets, so each drop is a real loss for whichever TCP sent the
packet (a drop in the sending host's own output path is reported back to its
TCP as a local failure and retried, which is not loss). Loss: nftables
``numgen random`` in the forward hook, both directions (this kernel has no
netem). Bottleneck: a ``tc tbf`` token bucket on the router's interface in
each direction.
"""

from __future__ import annotations

import contextlib

from tests.integration.netns import Namespace

TUN = "ustack0"
VETH = "ve-stack"


@contextlib.contextmanager
def _forward_rule(stack_ns: Namespace, table: str, rule: str):
    """One nftables rule in the stack namespace's forward hook, for the duration of the block."""
    script = f"""
table inet {table} {{
  chain path {{ type filter hook forward priority 0; {rule}; }}
}}"""
    stack_ns.run("nft", "-f", "-", input=script.encode())
    try:
        yield
    finally:
        stack_ns.run("nft", "delete", "table", "inet", table)


def random_loss(stack_ns: Namespace, percent: int):
    return _forward_rule(stack_ns, "ustack_loss", f"numgen random mod 100 < {percent} drop")


def ce_marks(stack_ns: Namespace, percent: int):
    """Congestion Experienced on ``percent`` % of forwarded ECN-capable (ECT(0)) IPv4 packets, as an
    AQM router would mark them (RFC 3168 §5); packets not marked ECT pass untouched."""
    return _forward_rule(stack_ns, "ustack_ce", f"ip ecn ect0 numgen random mod 100 < {percent} ip ecn set ce")


@contextlib.contextmanager
def bottleneck(stack_ns: Namespace, mbit: int):
    for dev in (TUN, VETH):  # towards the stack, and towards the client
        stack_ns.run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                     "burst", "32kb", "latency", "20ms")
    try:
        yield
    finally:
        for dev in (TUN, VETH):
            stack_ns.run("tc", "qdisc", "del", "dev", dev, "root")


@contextlib.contextmanager
def clean(stack_ns: Namespace):
    yield


CONDITIONS = {
    "clean": lambda ns: clean(ns),
    "loss5": lambda ns: random_loss(ns, 5),
    "bottleneck": lambda ns: bottleneck(ns, 40),
}
