"""stackctl's building blocks: pcap files, flow filters, telemetry messages, connection records."""

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import rdpcap

from pipeline.tools import ctl
from pipeline.bus import messages
from pipeline.pcap import LINKTYPE_RAW, FlowFilter, PcapWriter
from pipeline.flow import Flow
from tests.unit.tcp import builders as b
from workers.tcp.introspect import connection_record


def test_pcap_file_is_read_back_by_an_independent_reader(tmp_path):
    packets = [bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=8000) / b"hello"),
               bytes(IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=7, dport=5000) / (b"x" * 60000))]
    path = tmp_path / "out.pcap"
    with open(path, "wb") as f:
        writer = PcapWriter(f)
        writer.write(1700000000.25, packets[0])
        writer.write(1700000001.5, packets[1])
    header = path.read_bytes()[:24]
    assert struct.unpack("<IHHiIII", header)[6] == LINKTYPE_RAW
    read = rdpcap(str(path))
    assert [bytes(p) for p in read] == packets
    assert float(read[0].time) == pytest.approx(1700000000.25) and float(read[1].time) == pytest.approx(1700000001.5)


@pytest.mark.parametrize("spec,match", [
    ("10.0.0.1:40000", True), ("10.0.0.2:8000", True), (":8000", True), ("10.0.0.1", True),
    ("10.0.0.1:8001", False), ("10.0.0.9", False), (":7", False),
])
def test_flow_filter_on_packets(spec, match):
    packet = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=8000))
    assert FlowFilter(spec).matches_packet(packet) is match


def test_flow_filter_never_raises_on_junk_and_rejects_bad_specs():
    for junk in (b"", b"\x45", b"\x60" + bytes(40), bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=6))[:22]):
        assert FlowFilter(":1").matches_packet(junk) is False
    for bad in ("10.0.0.300:1", "x:y", ":70000"):
        with pytest.raises(ValueError):
            FlowFilter(bad)


def test_telemetry_messages_round_trip_and_junk_is_a_bus_error():
    assert messages.decode_telemetry(messages.encode_log(b'{"event": "x"}')) == {"event": "x"}
    assert messages.decode_telemetry(messages.encode_capturing("egress.1")) == messages.Capturing("egress.1")
    got = messages.decode_telemetry(messages.encode_captured("ingress.1", "in", 12.5, b"pkt"))
    assert got == messages.Captured("ingress.1", "in", 12.5, b"pkt")
    conns = messages.decode_telemetry(messages.encode_conns("tcp.1", [{"state": "ESTABLISHED"}]))
    assert conns == messages.Conns("tcp.1", [{"state": "ESTABLISHED"}])
    assert messages.decode(messages.encode_stop()) == messages.Stop()
    for junk in ([b"log."], [b"log.", b"[1]"], [b"pcap.", b"\xc1"], [b"pcap.", messages._packb([1, 10, "x", "up", 1.0]), b""],
                 [b"conns.", messages._packb([1, 11, "x", [1]])], [b"other", b"x"]):
        with pytest.raises(messages.BusError):
            messages.decode_telemetry(junk)
    assert all(not a.startswith(b) for a in messages.TOPICS for b in messages.TOPICS if a != b)


def test_connection_record_of_a_connection_with_data_in_flight():
    conn = b.syn_received(b.config(window_scaling=True, timestamps=True, sack=True), options=b.FULL)
    now = b.T0 + 0.05
    conn.receive(b.seg(conn, "A"), now)  # the handshake's ACK: an RTT sample
    b.drain(conn)
    conn.send(b"a" * 5000)
    conn.segments_to_send(now)
    record = connection_record(conn, bytes([10, 0, 0, 2]), Flow(bytes([10, 0, 0, 1]), b.REMOTE_PORT, b.LOCAL_PORT),
                               born=b.T0, now=now + 1)
    assert record["local"] == f"10.0.0.2:{b.LOCAL_PORT}" and record["remote"] == f"10.0.0.1:{b.REMOTE_PORT}"
    assert record["state"] == "ESTABLISHED"
    in_flight = (record["snd_nxt"] - record["snd_una"]) % 2**32  # Nagle holds back a small tail
    assert record["snd_nxt"] == int(conn.sender.snd_nxt) and 0 < in_flight == record["bytes_sent"] <= 5000
    assert record["sack"] and record["timestamps"] and record["wscale"] == [7, conn.options.rcv_wscale]
    assert record["srtt"] == pytest.approx(0.05) and record["rttvar"] == pytest.approx(0.025)
    assert record["send_buffer"] == [5000, conn.config.send_buffer] and record["recv_buffer"][0] == 0
    assert record["age"] == pytest.approx(1.05) and record["ecn"] is False
    assert messages.decode_telemetry(messages.encode_conns("tcp.1", [record])).records == [record]


# -- which stack stackctl talks to ---------------------------------------------------------

def _stack(run_dir: str, netns: int, attached: tuple[int, ...] = (), device: str = "ustack0") -> dict:
    return {"run_dir": run_dir, "netns": netns, "device": device,
            "attached": [{"path": f"/run/netns/n{a}", "netns": a} for a in attached]}


def test_an_attached_stack_serves_its_namespace_not_the_one_it_runs_in():
    own, attached = _stack("/run/ustack/1-ustack0", 1), _stack("/run/ustack/1-ustack0-attached-2", 1, (2,))
    assert ctl.pick_stack([own, attached], 2, None) is attached  # stackctl --netns box
    assert ctl.pick_stack([own, attached], 1, None) is own        # where both run: the one serving it
    assert ctl.pick_stack([attached], 1, None) is attached        # else the one running there
    assert ctl.pick_stack([own, attached], 3, None) is None


def test_two_stacks_serving_one_namespace_must_be_named():
    a, b = _stack("/run/ustack/1-ustack0", 1), _stack("/run/ustack/1-other0", 1, device="other0")
    with pytest.raises(SystemExit, match="2 stacks here .*USTACK_TUN"):
        ctl.pick_stack([a, b], 1, None)
    assert ctl.pick_stack([a, b], 1, "other0") is b
