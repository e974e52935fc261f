"""What the two SYNs agreed: the negotiated options of a connection, as one frozen value.

Contract: :meth:`Negotiated.from_syn` intersects the options of the peer's SYN
(or SYN-ACK) with our configuration, once, in the handshake; the SYN-cookie path
builds the same value with :meth:`Negotiated.offered` from what its cookie
carried.  Nothing changes it afterwards (RFC 7323 §2.2, §3.2 and RFC 2018 §2
fix every option at the SYN exchange).  ``DEFAULT`` is the value before any SYN
was seen: the RFC 9293 §3.7.1 default MSS and no options.  ``ts_clock`` is the
clock of our TSvals (RFC 7323 §5.4), here because every role that reads or
writes a timestamp option needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.wire.tcp import Flags, TcpOptions
from workers.tcp.config import TcpConfig

DEFAULT_MSS = 536            # RFC 9293 §3.7.1: send MSS when the peer sent no MSS option (IPv4)
MIN_PEER_MSS = 64            # floor for a peer's MSS option (Linux: 48), leaves room for 40 bytes of options
MAX_WINDOW_SHIFT = 14        # RFC 7323 §2.3
TS_OPTION_SPACE = 12         # NOP NOP TS (RFC 7323 Appendix A)


def ts_clock(now: float) -> int:
    """TSval: milliseconds, 32 bits (RFC 7323 §5.4: 1 ms - 1 s per tick)."""
    return int(now * 1000) & 0xFFFFFFFF


def window_shift(recv_buffer: int) -> int:
    """Smallest shift that lets a 16-bit window field cover recv_buffer (RFC 7323 §2.3)."""
    shift = 0
    while (recv_buffer >> shift) > 0xFFFF and shift < MAX_WINDOW_SHIFT:
        shift += 1
    return shift


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Options in force on a connection.

    peer_mss:    the peer's MSS option (floored at MIN_PEER_MSS; DEFAULT_MSS if absent)
    snd_wscale:  shift applied to the peer's window field; None = no window scaling
                 either way (RFC 7323 §2.2: only if both SYNs carried the option)
    rcv_wscale:  shift applied to our window field (0 without scaling)
    sack:        SACK-permitted on both SYNs (RFC 2018 §2)
    timestamps:  timestamps on both SYNs (RFC 7323 §3.2)
    ecn:         ECN-setup SYN answered by an ECN-setup SYN-ACK (RFC 3168 §6.1.1)
    """

    peer_mss: int = DEFAULT_MSS
    snd_wscale: int | None = None
    rcv_wscale: int = 0
    sack: bool = False
    timestamps: bool = False
    ecn: bool = False

    @classmethod
    def offered(cls, config: TcpConfig, mss: int | None, window_scale: int | None, sack_permitted: bool,
                timestamps: bool, ecn: bool = False) -> Negotiated:
        """Intersect what the peer offered with what config allows."""
        scaling = config.window_scaling and window_scale is not None
        return cls(
            peer_mss=max(mss or DEFAULT_MSS, MIN_PEER_MSS),
            # RFC 7323 §2.2: scaling only if both sides sent the option; §2.3: clamp to 14.
            snd_wscale=min(window_scale, MAX_WINDOW_SHIFT) if scaling and window_scale is not None else None,
            rcv_wscale=window_shift(config.recv_buffer) if scaling else 0,
            sack=config.sack and sack_permitted,
            timestamps=config.timestamps and timestamps,
            ecn=config.ecn and ecn,
        )

    @classmethod
    def from_syn(cls, opts: TcpOptions, config: TcpConfig, ecn: bool = False) -> Negotiated:
        """The options of the peer's SYN (RFC 9293 §3.7.1, RFC 7323 §2.2/§3.2, RFC 2018 §2)."""
        return cls.offered(config, opts.mss, opts.window_scale, opts.sack_permitted, opts.timestamp is not None,
                           ecn)

    @property
    def ws_ok(self) -> bool:
        return self.snd_wscale is not None

    def send_mss(self, config: TcpConfig) -> int:
        """RFC 9293 §3.7.1 Eff.snd.MSS = min(SendMSS+20, MMS_S) - TCPhdrsize - IPoptionsize.

        Our MMS_S - 20 is config.mss, and timestamps take 12 bytes of every header.
        """
        return min(self.peer_mss, config.mss) - (TS_OPTION_SPACE if self.timestamps else 0)

    def syn_ack_options(self, config: TcpConfig, tsval: int, ts_recent: int) -> tuple[Flags, TcpOptions]:
        """Flags and options of our SYN-ACK: only what the peer offered (RFC 7323 §2.2, §3.2; RFC 2018 §2)."""
        opts = TcpOptions(
            mss=config.mss,
            window_scale=self.rcv_wscale if self.ws_ok else None,
            sack_permitted=self.sack,
            timestamp=(tsval, ts_recent) if self.timestamps else None,
        )
        flags = Flags.SYN | Flags.ACK
        return (flags | Flags.ECE if self.ecn else flags), opts  # RFC 3168 §6.1.1 ECN-setup SYN-ACK

    def rcv_full(self, config: TcpConfig) -> int:
        """Payload of a full-sized segment from the peer."""
        return config.mss - (TS_OPTION_SPACE if self.timestamps else 0)


DEFAULT = Negotiated()


def syn_options(config: TcpConfig, tsval: int) -> tuple[Flags, TcpOptions]:
    """Flags and options of our SYN (active open): everything config allows."""
    opts = TcpOptions(
        mss=config.mss,
        window_scale=window_shift(config.recv_buffer) if config.window_scaling else None,
        sack_permitted=config.sack,
        timestamp=(tsval, 0) if config.timestamps else None,
    )
    # RFC 3168 §6.1.1: an ECN-setup SYN carries ECE and CWR.
    return (Flags.SYN | Flags.ECE | Flags.CWR if config.ecn else Flags.SYN), opts
