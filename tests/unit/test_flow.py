"""Flow: one value with its routing key and its bus form, for IPv4 and IPv6 peers."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.flow import Flow, client_key, flow_key, inbound_key, local_port, outbound_key

ports = st.integers(0, 0xFFFF)
addresses = st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16))


@given(addresses, ports, ports)
def test_key_and_bus_forms_round_trip(remote, rport, lport):
    flow = Flow(remote, rport, lport)
    assert Flow.from_key(flow.key) == flow
    assert Flow.from_bus(flow.bus()) == flow
    assert len(flow.key) == len(remote) + 4


def test_key_is_address_then_remote_then_local_port():
    assert Flow(b"\x0a\x00\x00\x01", 0x1234, 80).key == b"\x0a\x00\x00\x01\x12\x34\x00\x50"
    # A plain tuple underneath: the stack's own flows have an empty relayed destination.
    assert Flow(b"\x0a\x00\x00\x01", 1, 2) == (b"\x0a\x00\x00\x01", 1, 2, b"")


@given(addresses, ports, ports)
def test_relayed_flows_key_and_bus_forms_round_trip(remote, rport, lport):
    local = bytes(reversed(remote))  # a destination of the same family
    flow = Flow(remote, rport, lport, local)
    assert Flow.from_key(flow.key) == flow
    assert Flow.from_bus(flow.bus()) == flow
    assert flow.key == Flow(remote, rport, lport).key + local
    assert Flow(remote, rport, lport) != flow


def test_relayed_bus_form_rejects_a_destination_of_another_family():
    with pytest.raises(ValueError):
        Flow.from_bus([b"\x0a\x00\x00\x01", 1, 2, bytes(16)])


@pytest.mark.parametrize("item", [
    None, [], [b"\x0a\x00\x00\x01", 1], [b"abc", 1, 2], ["10.0.0.1", 1, 2],
    [b"\x0a\x00\x00\x01", -1, 2], [b"\x0a\x00\x00\x01", 1, 65536], [b"\x0a\x00\x00\x01", True, 2],
])
def test_bus_form_rejects_what_is_not_a_flow(item):
    with pytest.raises(ValueError):
        Flow.from_bus(item)


@given(addresses, ports, ports)
def test_every_key_builder_agrees_with_flow_key(remote, rport, lport):
    ours = bytes(reversed(remote))
    arriving = rport.to_bytes(2, "big") + lport.to_bytes(2, "big")  # as the peer's segment carries them
    sent = lport.to_bytes(2, "big") + rport.to_bytes(2, "big") + b"seq#"  # ours, as an ICMP error quotes it
    assert flow_key(remote, rport, lport) == Flow(remote, rport, lport).key == inbound_key(remote, arriving)
    assert inbound_key(remote, arriving, ours) == Flow(remote, rport, lport, ours).key
    assert outbound_key(remote, sent) == Flow(remote, rport, lport).key


@given(addresses, ports, ports, ports)
def test_client_key_and_local_port_read_a_key_for_steering(remote, rport, other, lport):
    key = Flow(remote, rport, lport).key
    assert local_port(key) == lport
    assert client_key(key) == client_key(Flow(remote, other, lport).key)  # any client port
    assert client_key(key) != client_key(Flow(remote, rport, lport ^ 1).key)
    assert local_port(Flow(remote, rport, lport, bytes(reversed(remote))).key) == -1  # relayed: never steered
