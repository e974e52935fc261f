"""stackctl: ask the running pipeline how it is doing.

    stackctl status          live processes, their heartbeat age, connections and counters
    stackctl status --json   the same, for machines
    stackctl flows [--json]  every TCP flow ingress routes, and the worker that owns it

It reads the same environment as the stack (USTACK_RUN_DIR or
USTACK_CONTROL_ENDPOINT, and the CURVE keys for a tcp:// control endpoint),
so it works from any shell on the stack's host.
"""

from __future__ import annotations

import argparse
import json
import sys

import zmq

from pipeline import config
from pipeline.bus import endpoints, messages
from pipeline.flow import Flow
from pipeline.wire.addr import fmt_addr, fmt_endpoint

TIMEOUT_MS = 2000


def request(command: str) -> messages.Reply:
    cfg = config.load()
    ctx = zmq.Context()
    sock = endpoints.control_request(ctx, cfg)
    try:
        sock.send_multipart(messages.encode_request(command))
        if not sock.poll(TIMEOUT_MS):
            raise SystemExit(f"stackctl: no answer from {cfg.control_endpoint} within {TIMEOUT_MS} ms "
                             "(is the stack running, with the same USTACK_* settings?)")
        msg = messages.decode(sock.recv_multipart())
    finally:
        sock.close(linger=0)
        ctx.term()
    if not isinstance(msg, messages.Reply):
        raise SystemExit("stackctl: unexpected answer")
    return msg


def _drops(stats: dict[str, int]) -> str:
    parts = [f"{k[5:]}={v}" for k, v in sorted(stats.items()) if k.startswith("drop_") and v]
    return " ".join(parts) or "-"


def render(status: dict) -> str:
    addresses = " and ".join(a for a in (status["address"], status.get("address6")) if a)
    lines = [f"ustack {addresses} on {status['device']}, ingress up {status['uptime']:.0f} s "
             f"(epoch {status['epoch']:08x})"]
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


def render_flows(rows: list[tuple[Flow, str]]) -> str:
    lines = [f"{'remote':<40} {'local port':>10}  worker"]
    for flow, worker in sorted(rows, key=lambda r: (r[1], r[0])):
        lines.append(f"{fmt_endpoint(flow.remote, flow.rport):<40} {flow.lport:>10}  {worker}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stackctl", description="Inspect a running ustack pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="live processes and their counters")
    status.add_argument("--json", action="store_true", help="print JSON")
    flows = sub.add_parser("flows", help="TCP flows and the workers that own them")
    flows.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    reply = request(args.command)
    if reply.status != "ok":
        print(f"stackctl: {reply.reason}", file=sys.stderr)
        return 1
    if args.command == "flows":
        rows = messages.decode_flow_table(reply.payload)
        if args.json:
            print(json.dumps([{"remote": fmt_addr(f.remote), "rport": f.rport, "lport": f.lport, "worker": w}
                              for f, w in rows], indent=2))
        else:
            print(render_flows(rows))
        return 0
    print(json.dumps(reply.payload, indent=2, sort_keys=True) if args.json else render(reply.payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
