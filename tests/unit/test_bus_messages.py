import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.bus import messages as m
from pipeline.flow import Flow


def test_plain_packets_round_trip():
    frames = m.encode_packets([(b"\x45packet", None), (b"\x45two", None)])
    assert frames[1:] == [b"\x45packet", b"\x45two"]  # each packet in its own frame
    assert m.decode(frames) == m.Packets([(b"\x45packet", None), (b"\x45two", None)])


def test_packets_with_offload_round_trip():
    items = [(b"p", (1, 1, 52, 1460, 20, 16)), (b"q", None)]
    assert m.decode(m.encode_packets(items)) == m.Packets(items)


def test_control_messages_round_trip():
    assert m.decode(m.encode_heartbeat("tcp.3", "tcp", 7, {"connections": 2})) == \
        m.Heartbeat("tcp.3", "tcp", 7, {"connections": 2})
    assert m.decode(m.encode_goodbye("tcp.3")) == m.Goodbye("tcp.3")
    assert m.decode(m.encode_welcome(99)) == m.Welcome(99)
    flow = Flow(b"\x0a\x00\x00\x01", 40000, 8000)
    assert m.decode(m.encode_flows("tcp.1", True, [flow], [])) == m.Flows("tcp.1", True, (flow,), ())
    assert m.decode(m.encode_request("status")) == m.Request("status")
    assert m.decode(m.encode_orphans([flow])) == m.Orphans((flow,))
    assert m.decode(m.encode_reply("ok", None, {"a": [1]})) == m.Reply("ok", None, {"a": [1]})


def test_layout_is_versioned_array():
    meta = msgpack.unpackb(m.encode_heartbeat("udp.1", "udp", 0)[0])
    assert meta == [m.VERSION, m.HEARTBEAT, "udp.1", "udp", 0, {}]


def test_a_heartbeat_carries_the_ports_steered_by_client_only_when_there_are_some():
    frames = m.encode_heartbeat("tcp.1", "tcp", 3, {"connections": 1}, frozenset({5201, 80}))
    assert msgpack.unpackb(frames[0]) == [m.VERSION, m.HEARTBEAT, "tcp.1", "tcp", 3, {"connections": 1}, [80, 5201]]
    assert m.decode(frames) == m.Heartbeat("tcp.1", "tcp", 3, {"connections": 1}, frozenset({80, 5201}))
    assert m.decode(m.encode_heartbeat("tcp.1", "tcp", 3, None, frozenset())) == m.Heartbeat("tcp.1", "tcp", 3)


def test_a_request_carries_its_arguments_only_when_there_are_some():
    assert msgpack.unpackb(m.encode_request("publish_list")[0]) == [m.VERSION, m.REQUEST, "publish_list"]
    frames = m.encode_request("publish_add", ["tcp:8080:80"])
    assert msgpack.unpackb(frames[0]) == [m.VERSION, m.REQUEST, "publish_add", ["tcp:8080:80"]]
    assert m.decode(frames) == m.Request("publish_add", ("tcp:8080:80",))


def test_the_published_table_round_trips():
    table = (("tcp", 8080, 80, 0), ("udp", 5353, 53, 2))
    frames = m.encode_published(table)
    # The first namespace's rows are as before the namespaces came: three fields.
    assert msgpack.unpackb(frames[0]) == [m.VERSION, m.PUBLISHED, [["tcp", 8080, 80], ["udp", 5353, 53, 2]]]
    assert m.decode(frames) == m.Published(table)
    assert m.decode(m.encode_published(())) == m.Published(())  # nothing published: still a table


@pytest.mark.parametrize("frames,reason", [
    ([msgpack.packb([1, 5, "publish_add", "tcp:1:2"])], "bad_request"),
    ([msgpack.packb([1, 5, "publish_add", [1]])], "bad_request"),
    ([msgpack.packb([1, 5, "a", [], 1])], "bad_fields"),
    ([msgpack.packb([1, 13, None])], "bad_published"),
    ([msgpack.packb([1, 13, [["sctp", 1, 2]]])], "bad_published"),
    ([msgpack.packb([1, 13, [["tcp", 0, 2]]])], "bad_published"),
    ([msgpack.packb([1, 13, [["tcp", 1, 65536]]])], "bad_published"),
    ([msgpack.packb([1, 13, [["tcp", 1]]])], "bad_published"),
    ([msgpack.packb([1, 13, [["tcp", True, 2]]])], "bad_published"),
    ([msgpack.packb([1, 13, [], 1])], "bad_fields"),
])
def test_malformed_requests_and_tables_raise_bus_error(frames, reason):
    with pytest.raises(m.BusError) as exc:
        m.decode(frames)
    assert str(exc.value) == reason


@pytest.mark.parametrize("frames,reason", [
    ([], "empty"),
    ([b"\xc1"], "bad_msgpack"),
    ([msgpack.packb({"a": 1})], "bad_meta"),
    ([msgpack.packb([99, 0, None]), b"x"], "bad_version"),
    ([msgpack.packb([1, 42])], "unknown_kind"),
    ([msgpack.packb([1, 0, None])], "packet_frames"),
    ([msgpack.packb([1, 0, [[1, 2]]]), b"x"], "bad_offload"),
    ([msgpack.packb([1, 0, [None, None]]), b"x"], "bad_offload"),
    ([msgpack.packb([1, 1, "a", "b"])], "bad_fields"),
    ([msgpack.packb([1, 1, 1, "b", 0, {}])], "bad_heartbeat"),
    ([msgpack.packb([1, 1, "a", "b", 0, {"x": "y"}])], "bad_heartbeat"),
    ([msgpack.packb([1, 1, "a", "b", 0, {}, [65536]])], "bad_heartbeat"),
    ([msgpack.packb([1, 1, "a", "b", 0, {}, [True]])], "bad_heartbeat"),
    ([msgpack.packb([1, 1, "a", "b", 0, {}, 5201])], "bad_heartbeat"),
    ([msgpack.packb([1, 1, "a", "b", 0, {}, [], 1])], "bad_fields"),
    ([msgpack.packb([1, 4, "a", True, [[b"ab", 1]], []])], "bad_flows"),
    ([msgpack.packb([1, 6, "maybe", None, None])], "bad_reply"),
])
def test_malformed_messages_raise_bus_error(frames, reason):
    with pytest.raises(m.BusError) as exc:
        m.decode(frames)
    assert str(exc.value) == reason


@given(st.lists(st.binary(max_size=64), max_size=4))
def test_any_frames_decode_or_raise_bus_error(frames):
    try:
        m.decode(frames)
    except m.BusError:
        pass


def test_flow_table_round_trips_through_a_reply():
    rows = [(Flow(b"\x0a\x00\x00\x01", 40000, 8000), "tcp.1", "a"), (Flow(bytes(range(16)), 1, 7), "tcp.2", "b")]
    reply = m.decode(m.encode_reply("ok", None, m.flow_table(rows)))
    assert m.decode_flow_table(reply.payload) == rows


@pytest.mark.parametrize("payload", [None, [[[b"\x0a\x00\x00\x01", 1, 2]]], [[[b"ab", 1, 2], "tcp.1", ""]],
                                     [[[b"\x0a\x00\x00\x01", 1, 2], 3, ""]], [[[b"\x0a\x00\x00\x01", 1, 2], "tcp.1"]]])
def test_flow_table_rejects_what_is_not_one(payload):
    with pytest.raises(m.BusError):
        m.decode_flow_table(payload)


def test_the_namespace_of_packets_flows_and_orphans_travels_only_when_not_the_first():
    flow = Flow(b"\x0a\x00\x00\x01", 40000, 8000)
    first = m.encode_packets([(b"\x45" + bytes(19), None)])
    assert m.decode(first) == m.Packets([(b"\x45" + bytes(19), None)])  # the plain frame, as ever
    third = m.encode_packets([(b"\x45" + bytes(19), None)], ns=3)
    assert msgpack.unpackb(third[0]) == [m.VERSION, m.PACKETS, None, None, 3]
    assert m.decode(third).ns == 3 and m.decode(m.encode_packets([(b"x", None)], [1.0], 2)).stamps == [1.0]
    assert m.decode(m.encode_flows("tcp.1", True, [flow], [], ns=2)) == m.Flows("tcp.1", True, (flow,), (), 2)
    assert m.decode(m.encode_flows("tcp.1", True, [flow], [])).ns == 0
    assert m.decode(m.encode_orphans([flow], ns=5)) == m.Orphans((flow,), 5)
    table = ((0, "a", "/run/netns/a"), (4, "b", "/proc/1/ns/net"))
    assert m.decode(m.encode_namespaces(table)) == m.Namespaces(table)


@pytest.mark.parametrize("fields", [[1, 0, None, None, -1], [1, 0, None, None, "a"], [1, 4, "t", True, [], [], "x"],
                                    [1, 7, [], 1, 2], [1, 14, [[0, "a"]]], [1, 14, [[-1, "a", "p"]]]])
def test_a_bad_namespace_field_is_refused(fields):
    with pytest.raises(m.BusError):
        m.decode([msgpack.packb(fields), b"\x45" + bytes(19)])
