"""Connections from a SYN cookie (RFC 4987 §3.6) keep the options the cookie carried:
``Connection.from_cookie(..., options=Negotiated.offered(...), ...)``."""

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from tests.unit.tcp.builders import LOCAL_ISS, LOCAL_PORT, REMOTE_ISS, REMOTE_PORT, T0, config, drain, seg
from workers.tcp.connection import Connection, State
from workers.tcp.events import Connected
from workers.tcp.options import Negotiated, window_shift

ALL = dict(window_scaling=True, timestamps=True, sack=True, recv_buffer=1 << 20)
COOKIE_TSVAL = 0x12345  # our SYN-ACK's TSval, with the cookie's option bits in it


def cookie_ack(window=1000, tsval=777, payload=b""):
    ts = (tsval, COOKIE_TSVAL) if tsval is not None else None
    return TcpSegment(REMOTE_PORT, LOCAL_PORT, seq_add(REMOTE_ISS, 1), seq_add(LOCAL_ISS, 1), Flags.ACK, window, payload,
                      TcpOptions(timestamp=ts))


def from_cookie(cfg, opts, ack=None):
    return Connection.from_cookie(LOCAL_PORT, REMOTE_PORT, ack or cookie_ack(), LOCAL_ISS, opts, cfg, T0)


def test_cookie_keeps_window_scaling_sack_and_timestamps():
    cfg = config(**ALL)
    opts = Negotiated.offered(cfg, mss=1400, window_scale=7, sack_permitted=True, timestamps=True)
    c = from_cookie(cfg, opts)
    assert c.state is State.ESTABLISHED and drain(c) == [Connected()]
    assert c.options == opts and c.options.ws_ok and c.options.sack and c.options.timestamps
    assert c.options.snd_wscale == 7 and c.sender.snd_wnd == 1000 << 7  # RFC 7323 §2.2: the ACK's window is scaled
    assert c.options.rcv_wscale == window_shift(1 << 20) == 5
    assert c.sender.send_mss == 1400 - 12 and c.options.peer_mss == 1400
    assert c.receiver.ts_recent == 777 and c.sender.rtt.srtt is None  # the cookie's TSecr is no RTT sample
    # Our segments carry the echo and a scaled window.
    c.receive(seg(c, "A", b"x" * 100, seq=seq_add(c.receiver.rcv_nxt, 100), options=TcpOptions(timestamp=(778, 0))), T0)
    [ack] = c.segments_to_send(T0)
    assert ack.options.timestamp == (int(T0 * 1000), 777)
    assert ack.options.sack_blocks == ((seq_add(REMOTE_ISS, 101), seq_add(REMOTE_ISS, 201)),)
    assert ack.window == cfg.initial_recv_buffer() >> 5  # the buffer starts small; the scale is the maximum's


def test_cookie_sends_full_segments_by_the_cookie_mss():
    cfg = config(**ALL, nagle=False)
    c = from_cookie(cfg, Negotiated.offered(cfg, mss=1000, window_scale=2, sack_permitted=False, timestamps=False),
                    cookie_ack(tsval=None))
    c.send(b"y" * 3000)
    out = c.segments_to_send(T0)
    assert [len(s.payload) for s in out] == [1000, 1000, 1000] and not c.options.sack and not c.options.timestamps


def test_cookie_options_are_limited_by_our_config():
    cfg = config()  # no scaling, SACK or timestamps here
    c = from_cookie(cfg, Negotiated.offered(cfg, mss=1460, window_scale=7, sack_permitted=True, timestamps=True))
    assert not c.options.ws_ok and not c.options.sack and not c.options.timestamps and c.sender.snd_wnd == 1000


def test_cookie_with_a_bare_mss_has_no_options():
    cfg = config(**ALL)
    c = from_cookie(cfg, 1200)
    assert c.options.peer_mss == 1200 and not c.options.ws_ok and not c.options.sack and not c.options.timestamps and c.sender.snd_wnd == 1000


def test_cookie_ack_with_data_delivers_it():
    cfg = config(**ALL)
    opts = Negotiated.offered(cfg, mss=1460, window_scale=0, sack_permitted=True, timestamps=True)
    c = from_cookie(cfg, opts, cookie_ack(payload=b"hello"))
    assert c.recv() == b"hello" and c.receiver.rcv_nxt == seq_add(REMOTE_ISS, 6)
