"""stackctl: look at a running stack, and stop it.

    stackctl [--netns NAME] status [--json]     live processes, heartbeat age, connections, counters
    stackctl counters [--json]                  every drop by reason, per process
    stackctl flows [--json] [--ns NS]           every TCP flow ingress routes, and the worker that owns it
    stackctl conns [--json] [--state S] [--addr A] [--ns NS]   every TCP connection of every worker (like ss -tin)
    stackctl logs [--follow] [--proc GLOB] [--level L] [--event E] [--flow ADDR:PORT] [--ns NS] [--console]
    stackctl capture -w FILE.pcap|- [-c N] [--flow ADDR:PORT]   packets both ways, as they crossed the device
    stackctl stop                               ordered shutdown: workers, then egress, then ingress
    stackctl list [--json]                      every stack on this machine and what it serves
    stackctl latency [--seconds S] [--json]     how long each stage holds a packet (pipeline.latency)
    stackctl publish add|remove PROTO:PORT:PORT [--ns NS]  publish a port inward, or stop (attach mode)
    stackctl publish list [--json] [--ns NS]    the ports published now, and into which namespace
    stackctl attach NS / detach NS              attach mode: serve one more namespace, or stop serving one
    stackctl namespaces [--json]                the namespaces an attached stack serves, their devices and flows

Which stack: the one serving the namespace stackctl runs in, or ``--netns
NAME`` — the namespace a stack runs in, or any one it is attached to. Each
stack's run directory under /run/ustack holds a file naming its device and
namespaces (``pipeline.stacklock``); its ipc sockets are files, reachable from
any namespace. USTACK_RUN_DIR or the endpoint variables (and the CURVE keys
for tcp:// endpoints) name a stack explicitly, as for the stack itself; with
them ``--netns`` enters that namespace just to reach it (it configures
nothing there). ``status``, ``counters``, ``stop``, ``publish``, ``attach``,
``detach`` and ``namespaces`` ask ingress over the control socket; ``logs``,
``capture`` and ``conns`` subscribe to the telemetry stream
(``pipeline.telemetry``).

A stack attached to several namespaces (``USTACK_ATTACH=a,b,c``) tells their
flows apart by the namespace they came from: ``--ns NS`` (a name the stack
lists in ``namespaces``, a path, or the same namespace by another name) keeps
only one namespace's flows, connections and log records, and names the
namespace a port is published into.
"""

from __future__ import annotations

import argparse
import ctypes
import fnmatch
import json
import os
import sys
import time

import zmq

from pipeline import config, stacklock
from pipeline.bus import endpoints, messages
from pipeline.flow import Flow
from pipeline.pcap import FlowFilter, PcapWriter
from pipeline.wire.addr import fmt_addr, fmt_endpoint, split_endpoint

TIMEOUT_MS = 2000
CONNS_WAIT = 3.0  # seconds to wait for every tcp worker's connection table
STOP_WAIT = 20.0  # seconds to wait for the stack to be gone after `stop`
LATENCY_SETTLE = 0.5  # seconds for the last samples to reach ingress (egress reports every 0.2 s)
_CLONE_NEWNET = 0x40000000
_LEVELS = ("debug", "info", "warning", "error", "critical")
# Log record fields that hold addresses and ports (pipeline and worker events).
_ADDR_FIELDS = ("remote", "src", "dst", "address", "host")
_NS_HELP = "attach mode: only this namespace's (a name stackctl namespaces lists, or a path)"
_PORT_FIELDS = ("rport", "lport", "sport", "dport")


def netns_path(name: str) -> str:
    return name if "/" in name else f"/run/netns/{name}"


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into a named network namespace before any socket."""
    path = netns_path(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SystemExit(f"stackctl: network namespace {name!r}: {exc.strerror}") from None
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SystemExit(f"stackctl: cannot enter network namespace {name!r}: {os.strerror(err)} "
                             "(needs root)")
    finally:
        os.close(fd)


# -- which stack ------------------------------------------------------------------------

_EXPLICIT = ("USTACK_RUN_DIR", "USTACK_CONTROL_ENDPOINT", "USTACK_MONITOR_ENDPOINT")


def serves(stack: dict, netns: int | None) -> bool:
    """An attached stack serves the namespaces it is attached to; another, the one it runs in."""
    attached = stack.get("attached") or []
    if attached:
        return any(a.get("netns") == netns for a in attached)
    return stack.get("netns") == netns


def pick_stack(stacks: list[dict], netns: int | None, device: str | None) -> dict | None:
    """The one stack serving ``netns`` (else the one running there); None if there is none."""
    if device:
        stacks = [s for s in stacks if s.get("device") == device]
    candidates = [s for s in stacks if serves(s, netns)] or [s for s in stacks if s.get("netns") == netns]
    if len(candidates) > 1:
        dirs = ", ".join(s["run_dir"] for s in candidates)
        raise SystemExit(f"stackctl: {len(candidates)} stacks here ({dirs}): name one with "
                         "USTACK_RUN_DIR=DIR or USTACK_TUN=DEVICE (see stackctl list)")
    return candidates[0] if candidates else None


def locate(netns: str | None) -> None:
    """Point this process at the stack serving ``netns`` (or our namespace) before loading the config."""
    if not any(name in os.environ for name in _EXPLICIT):
        inode = stacklock.netns_inode(netns_path(netns) if netns else "/proc/self/ns/net")
        if netns and inode is None:
            raise SystemExit(f"stackctl: no network namespace {netns!r} at {netns_path(netns)}")
        stack = pick_stack(stacklock.live_stacks(stacklock.RUN_BASE), inode, os.environ.get("USTACK_TUN"))
        if stack is not None:
            os.environ["USTACK_RUN_DIR"] = stack["run_dir"]
            return
    if netns:
        enter_netns(netns)  # explicit endpoints, or no stack found: the defaults of that namespace


def namespace_names() -> dict[int, str]:
    """Inode -> name of every namespace under /run/netns, and the initial one."""
    names = {}
    initial = stacklock.netns_inode("/proc/1/ns/net")
    if initial is not None:
        names[initial] = "(initial)"
    try:
        entries = os.listdir("/run/netns")
    except OSError:
        entries = []
    for entry in sorted(entries):
        inode = stacklock.netns_inode(f"/run/netns/{entry}")
        if inode is not None:
            names[inode] = entry
    return names


def stack_rows(stacks: list[dict], now: float) -> list[dict]:
    names = namespace_names()

    def ns(inode: int | None, path: str = "") -> dict:
        return {"inode": inode, "name": names.get(inode or -1) or path or f"net:[{inode}]"}
    return [{"run_dir": s["run_dir"], "device": s.get("device", ""), "netns": ns(s.get("netns")),
             "attached": [ns(a.get("netns"), a.get("path", "")) for a in s.get("attached") or []],
             "supervisor": s.get("supervisor"), "uptime": round(now - s["started"], 1) if "started" in s else None}
            for s in stacks]


def render_stacks(rows: list[dict]) -> str:
    if not rows:
        return "no stack is running"
    width = max(len(r["run_dir"]) for r in rows)
    lines = [f"{'run directory':<{width}} {'device':<9} {'runs in':<16} {'attached to':<16} {'pid':>7} {'uptime':>8}"]
    for r in rows:
        names = [a["name"] for a in r["attached"]]
        attached = ",".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "") or "-"
        uptime = "-" if r["uptime"] is None else f"{r['uptime']:.0f} s"
        lines.append(f"{r['run_dir']:<{width}} {r['device']:<9} {r['netns']['name']:<16} {attached:<16} "
                     f"{r['supervisor']!s:>7} {uptime:>8}")
    return "\n".join(lines)


def load_config() -> config.StackConfig:
    try:
        return config.load()
    except config.ConfigError as exc:
        raise SystemExit(f"stackctl: configuration error: {exc}") from None


def request(command: str, cfg: config.StackConfig, *args: str) -> messages.Reply:
    ctx = zmq.Context()
    sock = endpoints.control_request(ctx, cfg)
    try:
        sock.send_multipart(messages.encode_request(command, args))
        if not sock.poll(TIMEOUT_MS):
            raise SystemExit(f"stackctl: no answer from {cfg.control_endpoint} within {TIMEOUT_MS} ms "
                             "(is the stack running, in this namespace (--netns), with the same USTACK_* settings? "
                             "stackctl list shows every stack)")
        msg = messages.decode(sock.recv_multipart())
    finally:
        sock.close(linger=0)
        ctx.term()
    if not isinstance(msg, messages.Reply):
        raise SystemExit("stackctl: unexpected answer")
    if msg.status != "ok":
        raise SystemExit(f"stackctl: {msg.reason}")
    return msg


# -- status, counters, stop ------------------------------------------------------------

def _drops(stats: dict[str, int]) -> str:
    parts = [f"{k[5:]}={v}" for k, v in sorted(stats.items()) if k.startswith("drop_") and v]
    return " ".join(parts) or "-"


def render(status: dict) -> str:
    addresses = " and ".join(a for a in (status["address"], status.get("address6")) if a)
    lines = [f"ustack {addresses} on {status['device']}, ingress up {status['uptime']:.0f} s "
             f"(epoch {status['epoch']})"]
    attached = status.get("namespaces")
    if attached:
        lines.append(f"attached to {len(attached)} namespace{'s' if len(attached) > 1 else ''}: "
                     + ", ".join(r["name"] for r in attached))
    reassembly = status.get("reassembly")
    if reassembly is not None:
        lines.append(f"reassembly: {reassembly['datagrams']} datagrams, {reassembly['bytes']} bytes held")
    lines.append("")
    header = f"{'process':<12} {'role':<8} {'heartbeat':>9} {'conns':>6} {'flows':>6} {'pkts in':>10} " \
             f"{'pkts out':>10}  drops"
    lines.append(header)
    for p in status["processes"]:
        stats = p["stats"]
        lines.append(f"{p['name']:<12} {p['role']:<8} {p['heartbeat_age']:>8.1f}s "
                     f"{stats.get('connections', '-'):>6} {p['flows']:>6} {stats.get('packets_in', 0):>10} "
                     f"{stats.get('packets_out', 0):>10}  {_drops(stats)}")
    return "\n".join(lines)


def flow_rows(rows: list[tuple[Flow, str, str]]) -> list[dict]:
    """The ``flows`` table as ``--json`` prints it: a flow's ends, its worker, its namespace (attached)."""
    return [{"remote": fmt_addr(f.remote), "rport": f.rport, "lport": f.lport, "worker": w,
             **({"local": fmt_addr(f.local)} if f.local else {}), **({"ns": ns} if ns else {})}
            for f, w, ns in rows]


def render_flows(rows: list[tuple[Flow, str, str]]) -> str:
    with_ns = any(ns for _, _, ns in rows)
    lines = [f"{'remote':<40} {'local port':>10}  {'worker':<8}" + ("  namespace" if with_ns else "")]
    for flow, worker, ns in sorted(rows, key=lambda r: (r[2], r[1], r[0])):
        local = f"{fmt_addr(flow.local)}:{flow.lport}" if flow.local else str(flow.lport)  # relayed: its destination
        lines.append(f"{fmt_endpoint(flow.remote, flow.rport):<40} {local:>10}  {worker:<8}"
                     + (f"  {ns}" if with_ns else ""))
    return "\n".join(lines).rstrip()


def drop_counters(status: dict) -> dict[str, dict[str, int]]:
    return {p["name"]: {k[5:]: v for k, v in sorted(p["stats"].items()) if k.startswith("drop_")}
            for p in status["processes"]}


def render_counters(drops: dict[str, dict[str, int]]) -> str:
    lines = [f"{'process':<12} {'drop reason':<28} {'packets':>10}"]
    for name, reasons in drops.items():
        if not reasons:
            lines.append(f"{name:<12} {'-':<28} {0:>10}")
        for reason, count in reasons.items():
            lines.append(f"{name:<12} {reason:<28} {count:>10}")
    return "\n".join(lines)


def stop(cfg: config.StackConfig) -> int:
    names = request("stop", cfg).payload.get("stopping", [])
    print(f"stopping: {', '.join(names) or 'ingress'}", file=sys.stderr)
    deadline = time.monotonic() + STOP_WAIT
    ctx = zmq.Context()
    try:
        while time.monotonic() < deadline:  # the stack is gone when ingress stops answering
            sock = endpoints.control_request(ctx, cfg)
            sock.send_multipart(messages.encode_request("status"))
            answered = sock.poll(500)
            sock.close(linger=0)
            if not answered:
                print("stopped", file=sys.stderr)
                return 0
            time.sleep(0.2)
    finally:
        ctx.term()
    print("stackctl: the stack still answers", file=sys.stderr)
    return 1


def measure_latency(cfg: config.StackConfig, seconds: float) -> dict[str, dict[str, int]]:
    """The budget of the traffic of the next ``seconds`` (ingress stamps only while asked)."""
    request("latency_start", cfg)
    print(f"stackctl: measuring for {seconds:g} s: send traffic now", file=sys.stderr, flush=True)
    time.sleep(seconds + LATENCY_SETTLE)
    return request("latency", cfg).payload


def render_published(rows: list[dict]) -> str:
    if not rows:
        return "no port is published"
    with_ns = any("ns" in r for r in rows)
    lines = [f"{'proto':<6} {'port':>6} {'to port':>8}" + ("  namespace" if with_ns else "")]
    for r in rows:
        lines.append(f"{r['proto']:<6} {r['port']:>6} {r['to_port']:>8}" + (f"  {r.get('ns', '')}" if with_ns else ""))
    return "\n".join(lines).rstrip()


def publish(cfg: config.StackConfig, args: argparse.Namespace) -> int:
    """publish list, or one change: ingress checks it, keeps the table and tells the workers."""
    ns = namespace_of(cfg, args.ns) if args.ns else None
    if args.action == "list":
        rows = [r for r in request("publish_list", cfg).payload["published"] if ns is None or r.get("ns") == ns]
        print(json.dumps(rows, indent=2) if args.json else render_published(rows))
        return 0
    changed = request("publish_" + args.action, cfg, args.item, *([ns] if ns else [])).payload["changed"]
    done = "published" if args.action == "add" else "no longer published"
    into = f" (namespace {changed['ns']})" if ns and changed.get("ns") else ""  # one namespace: as it always said
    print(f"{changed['proto']}:{changed['port']}:{changed['to_port']} {done}{into}")
    return 0


# -- namespaces (attach mode) ---------------------------------------------------------

def resolve_namespace(rows: list[dict], value: str) -> str | None:
    """The stack's name for the attached namespace ``value`` names: its name, its path, or the same
    namespace by another name or path (compared by inode); None if the stack does not serve it."""
    for r in rows:
        if value in (r["name"], r["path"]) or netns_path(value) == r["path"]:
            return r["name"]
    inode = stacklock.netns_inode(netns_path(value))
    if inode is not None:
        for r in rows:
            if stacklock.netns_inode(r["path"]) == inode:
                return r["name"]
    return None


def namespaces(cfg: config.StackConfig) -> list[dict]:
    """Every namespace the stack serves: ``{"index", "name", "path", "device"}``, as ingress says."""
    return request("namespaces", cfg).payload["namespaces"]


def namespace_of(cfg: config.StackConfig, value: str) -> str:
    """``--ns VALUE`` as the stack names it; exit with the attached ones if it serves no such namespace."""
    rows = namespaces(cfg)
    name = resolve_namespace(rows, value)
    if name is None:
        served = ", ".join(r["name"] for r in rows) or "none"
        raise SystemExit(f"stackctl: the stack is not attached to {value!r} (attached: {served})")
    return name


def flows_per_namespace(rows: list[tuple[Flow, str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, ns in rows:
        counts[ns] = counts.get(ns, 0) + 1
    return counts


def namespace_rows(rows: list[dict], flows: dict[str, int]) -> list[dict]:
    """``namespaces --json``: each namespace as ingress lists it, with the TCP flows it has now
    (ingress's count, else ``flows``, counted from the flow table)."""
    return [{**r, "flows": r["flows"] if "flows" in r else flows.get(r["name"], 0)}
            for r in sorted(rows, key=lambda r: r["index"])]


def render_namespaces(rows: list[dict]) -> str:
    if not rows:
        return "attached to no namespace"
    width = max(12, *(len(r["name"]) for r in rows))
    lines = [f"{'index':>5}  {'namespace':<{width}}  {'device':<9} {'flows':>6}  path"]
    for r in rows:
        lines.append(f"{r['index']:>5}  {r['name']:<{width}}  {r['device']:<9} {r['flows']:>6}  {r['path']}")
    return "\n".join(lines)


def attach_or_detach(cfg: config.StackConfig, args: argparse.Namespace) -> int:
    """``attach NS`` (ingress opens its device pair there) or ``detach NS`` (its flows are closed,
    its device removed); then the namespaces served, as ``namespaces`` prints them."""
    target = args.namespace
    if args.command == "detach":
        target = resolve_namespace(namespaces(cfg), target) or target  # a path or another name of it
    rows = request(args.command, cfg, target).payload["namespaces"]
    print(f"{'attached' if args.command == 'attach' else 'detached'} {args.namespace}", file=sys.stderr)
    print(render_namespaces(namespace_rows(rows, {})))
    return 0


def render_latency(budget: dict[str, dict[str, int]]) -> str:
    if not budget:
        return "no packets crossed the stack while measuring"
    lines = [f"{'stage':<10} {'p50 µs':>9} {'p99 µs':>9} {'count':>8}"]
    for stage, row in budget.items():
        lines.append(f"{stage:<10} {row['p50_us']:>9} {row['p99_us']:>9} {row['count']:>8}")
    return "\n".join(lines)


# -- telemetry: logs, conns, capture ----------------------------------------------------

def _subscribe(cfg: config.StackConfig, topic: bytes) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    return ctx, endpoints.telemetry_subscriber(ctx, cfg, topic)


def _receive(sock: zmq.Socket, timeout_ms: int):
    """The next telemetry message, None after ``timeout_ms`` of silence; malformed ones skipped."""
    if not sock.poll(timeout_ms):
        return None
    try:
        return messages.decode_telemetry(sock.recv_multipart())
    except messages.BusError:
        return _receive(sock, 0) if sock.poll(0) else None


def record_fields(record: dict) -> tuple[set[str], set[int]]:
    addrs = {str(record[k]) for k in _ADDR_FIELDS if k in record}
    ports = {record[k] for k in _PORT_FIELDS if isinstance(record.get(k), int)}
    return addrs, ports


def log_filter(args: argparse.Namespace, ns: str | None = None):
    """Which records ``logs`` prints; ``ns`` (the stack's name of ``--ns``): only that namespace's."""
    flow = FlowFilter(args.flow) if args.flow else None
    lowest = _LEVELS.index(args.level)

    def keep(record: dict) -> bool:
        if ns is not None and record.get("ns") != ns:
            return False
        if args.proc and not fnmatch.fnmatchcase(str(record.get("proc", "")), args.proc):
            return False
        if args.event and not fnmatch.fnmatchcase(str(record.get("event", "")), args.event):
            return False
        level = str(record.get("level", "info"))
        if level in _LEVELS and _LEVELS.index(level) < lowest:
            return False
        return flow is None or flow.matches(*record_fields(record))
    return keep


def logs(cfg: config.StackConfig, args: argparse.Namespace) -> int:
    keep = log_filter(args, namespace_of(cfg, args.ns) if args.ns else None)
    if args.console:
        import structlog

        render_line = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    ctx, sock = _subscribe(cfg, messages.LOG_TOPIC)
    deadline = None if args.follow else time.monotonic() + args.seconds
    try:
        while deadline is None or time.monotonic() < deadline:
            record = _receive(sock, 200)
            if not isinstance(record, dict) or not keep(record):
                continue
            line = render_line(None, "", dict(record)) if args.console else json.dumps(record)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
        ctx.term()
    return 0


def connection_tables(cfg: config.StackConfig) -> list[dict]:
    """Every tcp worker's connections, each record with its ``worker``."""
    workers = {p["name"] for p in request("status", cfg).payload["processes"] if p["role"] == "tcp"}
    ctx, sock = _subscribe(cfg, messages.CONNS_TOPIC)  # subscribing asks every worker
    tables: dict[str, list[dict]] = {}
    deadline = time.monotonic() + CONNS_WAIT
    try:
        while not workers <= tables.keys() and time.monotonic() < deadline:
            msg = _receive(sock, 100)
            if isinstance(msg, messages.Conns) and msg.name not in tables:
                tables[msg.name] = msg.records
    finally:
        sock.close(linger=0)
        ctx.term()
    missing = workers - tables.keys()
    if missing:
        print(f"stackctl: no connection table from {', '.join(sorted(missing))}", file=sys.stderr)
    return [{"worker": name, **r} for name in sorted(tables) for r in tables[name]]


def conn_filter(args: argparse.Namespace, ns: str | None = None):
    """Which connections ``conns`` prints; ``ns`` (the stack's name of ``--ns``): only that namespace's."""
    state = args.state.upper().replace("_", "-") if args.state else None
    flow = FlowFilter(args.addr) if args.addr else None

    def keep(record: dict) -> bool:
        if ns is not None and record.get("ns") != ns:
            return False
        if state is not None and record["state"] != state:
            return False
        if flow is None:
            return True
        ends = [split_endpoint(record["local"]), split_endpoint(record["remote"])]
        return any(flow.matches({addr}, {int(port)}) for addr, port in ends)
    return keep


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3g}"


def render_conns(records: list[dict]) -> str:
    with_ns = any(r.get("ns") for r in records)
    lines = [f"{'worker':<8} {'state':<12} {'local':<21} {'remote':<21} {'send-q':>9} {'recv-q':>9}"
             + ("  namespace" if with_ns else "")]
    for r in records:
        flags = [name for name in ("sack", "timestamps", "ecn") if r.get(name)]
        if r.get("wscale"):
            flags.append(f"wscale:{r['wscale'][0]},{r['wscale'][1]}")
        lines.append(f"{r['worker']:<8} {r['state']:<12} {r['local']:<21} {r['remote']:<21} "
                     f"{r['send_buffer'][0] if r['send_buffer'][0] is not None else '-':>9} "
                     f"{r['recv_buffer'][0]:>9}" + (f"  {r.get('ns', '')}" if with_ns else ""))
        lines.append(f"\t {' '.join(flags)} rto:{_ms(r['rto'])} rtt:{_ms(r['srtt'])}/{_ms(r['rttvar'])} "
                     f"mss:{r['mss']} cwnd:{r['cwnd']} ssthresh:{r['ssthresh']} snd_una:{r['snd_una']} "
                     f"snd_nxt:{r['snd_nxt']} rcv_nxt:{r['rcv_nxt']} snd_wnd:{r['snd_wnd']} "
                     f"bytes_sent:{r['bytes_sent']} bytes_received:{r['bytes_received']} "
                     f"segs_out:{r['segments_out']} segs_in:{r['segments_in']} "
                     f"retrans:{r['retransmissions']} timeouts:{r['timeouts']} "
                     f"sndbuf:{r['send_buffer'][1]} rcvbuf:{r['recv_buffer'][1]} age:{r['age']:.1f}s")
    return "\n".join(lines)


def capture(cfg: config.StackConfig, args: argparse.Namespace) -> int:
    flow = FlowFilter(args.flow) if args.flow else None
    if args.write == "-" and sys.stdout.isatty():
        raise SystemExit("stackctl: capture -w - writes binary pcap: pipe it (| tshark -r -) or give a file")
    out = sys.stdout.buffer if args.write == "-" else open(args.write, "wb")
    writer = PcapWriter(out)
    ctx, sock = _subscribe(cfg, messages.CAPTURE_TOPIC)
    count = 0
    try:
        while args.count is None or count < args.count:
            msg = _receive(sock, 200)
            if isinstance(msg, messages.Capturing):
                print(f"stackctl: capturing at {msg.name}", file=sys.stderr, flush=True)
            elif isinstance(msg, messages.Captured) and (flow is None or flow.matches_packet(msg.packet)):
                writer.write(msg.time, msg.packet)
                count += 1
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        sock.close(linger=0)
        ctx.term()
        if out is not sys.stdout.buffer:
            out.close()
    print(f"stackctl: {count} packets captured", file=sys.stderr)
    return 0


# -- command line ---------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stackctl", description="Look at a running ustack, and stop it.")
    p.add_argument("--netns", metavar="NAME",
                   help="the stack serving this network namespace (attached to it), or running in it")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="live processes and their counters")
    s.add_argument("--json", action="store_true", help="print JSON")
    s = sub.add_parser("counters", help="every drop by reason, per process")
    s.add_argument("--json", action="store_true", help="print JSON")
    s = sub.add_parser("flows", help="TCP flows and the workers that own them")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--ns", metavar="NS", help=_NS_HELP)
    sub.add_parser("stop", help="ordered shutdown: workers reset their connections, egress drains, ingress exits")
    s = sub.add_parser("list", help="every stack on this machine: run directory, namespaces, pid, uptime")
    s.add_argument("--json", action="store_true", help="print JSON")
    s = sub.add_parser("latency", help="how long each stage holds a packet, over traffic sent meanwhile")
    s.add_argument("--seconds", type=float, default=3.0, help="how long to measure (default 3)")
    s.add_argument("--json", action="store_true", help="print JSON: {stage: {p50_us, p99_us, count}}")
    s = sub.add_parser("conns", help="every TCP connection of every worker, like ss -tin")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--state", help="only connections in this state (e.g. ESTABLISHED, time-wait)")
    s.add_argument("--addr", help="only connections with this ADDR:PORT, ADDR or :PORT at either end")
    s.add_argument("--ns", metavar="NS", help=_NS_HELP)
    s = sub.add_parser("logs", help="log records of every process, one JSON object per line")
    s.add_argument("-f", "--follow", action="store_true", help="until interrupted")
    s.add_argument("--seconds", type=float, default=2.0, help="without --follow: how long to listen (default 2)")
    s.add_argument("--proc", help="processes whose name matches this glob (e.g. 'tcp.*')")
    s.add_argument("--level", choices=_LEVELS, default="debug", help="this level and above")
    s.add_argument("--event", help="events matching this glob (e.g. 'tcp_*')")
    s.add_argument("--flow", help="records with this ADDR:PORT, ADDR or :PORT")
    s.add_argument("--ns", metavar="NS", help="attach mode: only records of this namespace's flows")
    s.add_argument("--console", action="store_true", help="readable lines instead of JSON")
    s = sub.add_parser("capture", help="packets crossing the device, both ways, as pcap")
    s.add_argument("-w", "--write", required=True, metavar="FILE", help="pcap file, or - for stdout")
    s.add_argument("-c", "--count", type=int, help="stop after this many packets")
    s.add_argument("--flow", help="packets with this ADDR:PORT, ADDR or :PORT")
    s = sub.add_parser("publish", help="ports published inward (attach mode): list, add, remove while it runs")
    actions = s.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list", help="the ports published now")
    a.add_argument("--json", action="store_true", help="print JSON: [{proto, port, to_port, ns}]")
    a.add_argument("--ns", metavar="NS", help="only the ports published into this namespace")
    for action, what in (("add", "listen on PORT where the stack runs and relay into the namespace's PORT"),
                         ("remove", "stop listening (connections already relayed carry on)")):
        a = actions.add_parser(action, help=what)
        a.add_argument("item", metavar="PROTO:PORT:PORT", help="e.g. tcp:8080:80 or udp:5353:53")
        a.add_argument("--ns", metavar="NS", help="the namespace it is published into (default: the first attached)")
    for action, what in (("attach", "serve one more namespace: a name under /run/netns or a path "
                                    "(/proc/PID/ns/net); its device is made there"),
                         ("detach", "stop serving a namespace: its flows are closed, its device removed")):
        s = sub.add_parser(action, help=what)
        s.add_argument("namespace", metavar="NS", help="a name under /run/netns, or a path such as /proc/PID/ns/net")
    s = sub.add_parser("namespaces", help="attach mode: the namespaces served, their devices and TCP flows")
    s.add_argument("--json", action="store_true", help="print JSON: [{index, name, path, device, flows}]")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parser().parse_args(argv))
    except BrokenPipeError:  # `stackctl logs -f | head`: the reader is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(args: argparse.Namespace) -> int:
    for name in ("flow", "addr"):
        if getattr(args, name, None):
            try:
                FlowFilter(getattr(args, name))
            except ValueError as exc:
                raise SystemExit(f"stackctl: --{name} {exc}") from None
    if args.command == "list":
        rows = stack_rows(stacklock.live_stacks(stacklock.RUN_BASE), time.time())
        print(json.dumps(rows, indent=2) if args.json else render_stacks(rows))
        return 0
    locate(args.netns)
    cfg = load_config()
    if args.command == "status":
        status = request("status", cfg).payload
        print(json.dumps(status, indent=2, sort_keys=True) if args.json else render(status))
    elif args.command == "counters":
        drops = drop_counters(request("status", cfg).payload)
        print(json.dumps(drops, indent=2, sort_keys=True) if args.json else render_counters(drops))
    elif args.command == "flows":
        ns = namespace_of(cfg, args.ns) if args.ns else None
        rows = [r for r in messages.decode_flow_table(request("flows", cfg).payload) if ns is None or r[2] == ns]
        print(json.dumps(flow_rows(rows), indent=2) if args.json else render_flows(rows))
    elif args.command == "stop":
        return stop(cfg)
    elif args.command == "latency":
        budget = measure_latency(cfg, args.seconds)
        print(json.dumps(budget, indent=2) if args.json else render_latency(budget))
    elif args.command == "conns":
        keep = conn_filter(args, namespace_of(cfg, args.ns) if args.ns else None)
        records = [r for r in connection_tables(cfg) if keep(r)]
        print(json.dumps(records, indent=2) if args.json else render_conns(records))
    elif args.command == "logs":
        return logs(cfg, args)
    elif args.command == "capture":
        return capture(cfg, args)
    elif args.command == "publish":
        return publish(cfg, args)
    elif args.command in ("attach", "detach"):
        return attach_or_detach(cfg, args)
    elif args.command == "namespaces":
        rows = namespaces(cfg)
        counted = all("flows" in r for r in rows)
        flows = {} if counted else flows_per_namespace(messages.decode_flow_table(request("flows", cfg).payload))
        rows = namespace_rows(rows, flows)
        print(json.dumps(rows, indent=2) if args.json else render_namespaces(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
