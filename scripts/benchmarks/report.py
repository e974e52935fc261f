"""The report: the machine it ran on, the table's rows (each figure, its reference, their ratio and the
target) from a run's raw figures, and the table as printed."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess

from .attach import MANY_PSS_BOUND_MB
from .common import MB, ROOT, number
from .latency import budget_lines
from .synflood import FLOOD_RSS_BOUND_MB

IDLE_STACK_PSS_BOUND_MB = 110  # issue 21: the default stack idle at most 110 MB


def machine() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    stack_python = subprocess.run(["python3", "-c", "import platform; print(platform.python_version())"],
                                  capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"], capture_output=True, text=True)
    commit = (git.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")) if git.returncode == 0 else "unknown"
    return {"cores": os.cpu_count(), "cpu_model": model, "commit": commit, "kernel": f"{platform.system()} {platform.release()}",
            "python": stack_python or platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}


def _get(raw: dict, key: str, field: str):
    return raw.get(key, {}).get(field) if isinstance(raw.get(key), dict) else None


def metrics(raw: dict) -> list[dict]:
    """The table's rows: figure, reference, ratio, target (as a ratio or an absolute bound), met."""
    rows: list[dict] = []

    def row(key, label, unit, value, ref_name=None, ref=None, target=None, bound=None, better="higher"):
        ratio = value / ref if value is not None and ref else None
        met = None
        if target is not None and ratio is not None:  # a bound on the ratio
            met = ratio <= target if better == "lower" else ratio >= target
        if bound is not None and value is not None:    # a bound on the value itself
            met = value < bound if better == "lower" else value >= bound
        if target is not None:
            tgt = f"ratio {'<=' if better == 'lower' else '>='} {target:g}"
        elif bound is not None:
            tgt = f"{'<' if better == 'lower' else '>='} {bound:g} {unit}"
        else:
            tgt = None
        rows.append({"key": key, "figure": label, "unit": unit, "ustack": value, "reference": ref_name,
                     "reference_value": ref, "ratio": ratio, "target": tgt, "met": met})

    for p in ("p50", "p99"):
        v = _get(raw, "ping_ustack", f"{p}_us")
        row(f"ping_{p}_us", f"ping {p}", "µs", v, "minimal responder", _get(raw, "ping_minimal_responder", f"{p}_us"),
            target=3 if p == "p50" else None, better="lower")
        row(f"ping_{p}_us_vs_kernel", f"ping {p}", "µs", v, "kernel loopback", _get(raw, "ping_kernel_loopback",
                                                                                     f"{p}_us"))
    for n in (1, 64):
        row(f"udp_echo_{n}_per_s", f"UDP echo, {n} in flight", "/s", _get(raw, f"udp{n}_ustack", "rate"),
            "minimal responder", _get(raw, f"udp{n}_minimal_responder", "rate"), target=0.35 if n == 64 else None)
    row("tcp_conn_per_s", "TCP connect+line+close", "/s", _get(raw, "conn_ustack", "rate"),
        "kernel loopback", _get(raw, "conn_kernel_loopback", "rate"), target=0.6)
    for direction, label in (("discard", "TCP bulk into discard"), ("chargen", "TCP bulk out of chargen")):
        for conns in sorted({int(k[len(f"bulk_{direction}"):].split("_")[0]) for k in raw
                             if k.startswith(f"bulk_{direction}")}):
            row(f"tcp_{direction}_{conns}conn_mbit_s", f"{label}, {conns} conn", "Mbit/s",
                _get(raw, f"bulk_{direction}{conns}_ustack", "mbit_s"), "kernel loopback",
                _get(raw, f"bulk_{direction}{conns}_kernel_loopback", "mbit_s"),
                target=0.25 if conns == 1 else None)
    v4 = "ustack over IPv4"
    row("ping6_p50_us", "ping p50, IPv6", "µs", _get(raw, "ping6_ustack", "p50_us"), v4,
        _get(raw, "ping_ustack", "p50_us"), better="lower")
    row("ping6_p50_us_vs_kernel", "ping p50, IPv6", "µs", _get(raw, "ping6_ustack", "p50_us"), "kernel loopback ::1",
        _get(raw, "ping6_kernel_loopback", "p50_us"), better="lower")
    for key, label in (("ping_frag", "ping -s 4000 p50"), ("ping6_frag", "ping -s 4000 p50, IPv6")):
        row(f"{key}_p50_us", label, "µs", _get(raw, f"{key}_ustack", "p50_us"), "kernel loopback (no fragments)",
            _get(raw, "ping_frag_kernel_loopback", "p50_us"), better="lower")
    for n in (1, 64):
        row(f"udp6_echo_{n}_per_s", f"UDP echo, {n} in flight, IPv6", "/s", _get(raw, f"udp{n}_ustack6", "rate"), v4,
            _get(raw, f"udp{n}_ustack", "rate"))
    for direction, label in (("discard", "TCP bulk into discard"), ("chargen", "TCP bulk out of chargen")):
        row(f"tcp6_{direction}_1conn_mbit_s", f"{label}, 1 conn, IPv6", "Mbit/s",
            _get(raw, f"bulk6_{direction}1_ustack", "mbit_s"), v4, _get(raw, f"bulk_{direction}1_ustack", "mbit_s"))
    for direction, label in (("discard", "CPU into discard"), ("chargen", "CPU out of chargen")):
        row(f"cpu_{direction}_s_per_gb", label, "s/GB", _get(raw, f"cpu_{direction}_ustack", "cpu_s_per_gb"),
            "kernel loopback (both ends)", _get(raw, f"cpu_{direction}_kernel_loopback", "cpu_s_per_gb"),
            target=4, better="lower")
    row("http_ab_per_s", "HTTP requests (ab)", "/s", _get(raw, "http_ab_ustack", "rate"),
        "python http.server, loopback", _get(raw, "http_ab_kernel_loopback", "rate"))
    row("http_download_mbit_s", "HTTP download (curl)", "Mbit/s", _get(raw, "http_download_ustack", "mbit_s"),
        "python http.server, loopback", _get(raw, "http_download_kernel_loopback", "mbit_s"))
    for direction, label in (("normal", "iperf3, client sends"), ("reverse", "iperf3 -R, we send")):
        row(f"iperf3_{direction}_mbit_s", label, "Mbit/s", _get(raw, f"iperf3_{direction}_ustack", "mbit_s"),
            "iperf3 -s, loopback", _get(raw, f"iperf3_{direction}_kernel_loopback", "mbit_s"))
    pss = raw.get("idle_stack_pss")
    if pss:  # every process of a fresh default stack, honcho's too
        row("idle_stack_pss_mb", "idle stack PSS (MB, all processes incl. honcho)", "MB", pss["total_mb"],
            bound=IDLE_STACK_PSS_BOUND_MB, better="lower")
    idle = raw.get("idle")
    if idle:
        row("tcp_idle_rss_mb", f"tcp.1 RSS, {idle['connections']} idle conns", "MB", idle["tcp_rss_kb"] * 1024 / MB,
            "same worker before", idle["tcp_rss_before_kb"] * 1024 / MB,
            bound=100 if idle["connections"] >= 10_000 else None, better="lower")
    for name, kb in raw.get("peak_rss_kb", {}).items():
        row(f"peak_rss_mb_{name}", f"peak RSS {name}", "MB", kb * 1024 / MB, "minimal responder",
            raw["peak_rss_kb_minimal_responder"] * 1024 / MB)
    for mode, label in (("u10", "SYN flood -i u10"), ("flood", "SYN flood --flood")):
        f = raw.get(f"synflood_{mode}")
        if not f:
            continue
        n = f["clients"]
        row(f"synflood_{mode}_completed", f"{label}: completed", f"of {n}", f["completed"],
            bound=n if mode == "u10" else None)
        row(f"synflood_{mode}_within_3s", f"{label}: within 3 s", f"of {n}", f["within_3s"],
            bound=27 if mode == "flood" else None)
        row(f"synflood_{mode}_median_connect_ms", f"{label}: median connect", "ms", f["median_connect_ms"],
            bound=50 if mode == "u10" else None, better="lower")
        row(f"synflood_{mode}_after_ms", f"{label}: connect 1 s after", "ms", f["after_median_connect_ms"],
            bound=50, better="lower")
        for name, kb in f["rss_kb"].items():
            row(f"synflood_{mode}_rss_mb_{name}", f"{label}: RSS {name}", "MB", kb * 1024 / MB,
                bound=FLOOD_RSS_BOUND_MB, better="lower")
        new = raw.get(f"synflood_{mode}_new")
        if new:  # no target of their own: the are met or not by the rows above
            row(f"synflood_{mode}_new_completed", f"{label}, new sources: completed", f"of {n}", new["completed"])
            row(f"synflood_{mode}_new_within_3s", f"{label}, new sources: within 3 s", f"of {n}", new["within_3s"])
            row(f"synflood_{mode}_new_median_connect_ms", f"{label}, new sources: median connect", "ms",
                new["median_connect_ms"], better="lower")
    many = raw.get("attach_many")
    if many:
        n, slirp = many["namespaces"], "slirp4netns, one per namespace"
        kb = (lambda key: many[key] * 1024 / MB if key in many else None)
        row("attach_many_served", "attach: namespaces served by one stack", f"of {n}", many.get("ustack_served"),
            slirp, many.get("slirp_served"), bound=n)
        row("attach_many_pss_mb", f"attach: PSS for {n} namespaces, every process", "MB", kb("ustack_pss_kb"),
            slirp, kb("slirp_pss_kb"), bound=MANY_PSS_BOUND_MB, better="lower")
        row("attach_many_processes", f"attach: processes for {n} namespaces", "", many.get("ustack_processes"),
            slirp, many.get("slirp_processes"), better="lower")
        if "ustack_one_pss_kb" in many and "ustack_pss_kb" in many:
            extra = (many["ustack_pss_kb"] - many["ustack_one_pss_kb"]) * 1024 / MB / (n - 1)
            row("attach_many_pss_mb_per_namespace", "attach: PSS of one namespace more", "MB", extra,
                "slirp4netns, one process", kb("slirp_pss_kb") / n if "slirp_pss_kb" in many else None,
                better="lower")
            row("attach_one_pss_mb", "attach: PSS for 1 namespace, every process", "MB", kb("ustack_one_pss_kb"),
                better="lower")
    if raw.get("build_compiled") and raw.get("build_pure"):
        c, p = raw["build_compiled"], raw["build_pure"]
        row("build_ping_p50_us", "ping p50, compiled", "µs", c["ping"], "same stack pure", p["ping"], better="lower")
        row("build_udp64_per_s", "UDP echo 64, compiled", "/s", c["udp64"], "same stack pure", p["udp64"])
        row("build_conn_per_s", "TCP connect+line+close, compiled", "/s", c["conn"], "same stack pure", p["conn"])
        row("build_discard1_mbit_s", "TCP bulk into discard, compiled", "Mbit/s", c["discard1"], "same stack pure",
            p["discard1"])
    return rows


def table(report: dict) -> str:
    """The report as printed: what ran where, one line per row, the ping's latency budget, warnings, errors."""
    m = report["machine"]
    s = report["settings"]
    out = [f"ustack benchmark, {report['date']} ({'quick' if s['quick'] else 'full'} run)",
           f"machine: {m['cores']} cores, {m['cpu_model']}, {m['memory_gb']} GB, {m['kernel']}, Python {m['python']}",
           f"stack: commit {m['commit']}, started with honcho start (one process of each kind)",
           f"clients: ping -i 0.001 ({s['repetitions']} x {s['ping_count']}); one Python UDP socket; "
           f"{s['conn_clients']} client processes for connections; one thread per bulk connection; "
           f"medians of {s['repetitions']} repetition(s); ab -n {s['ab_requests']} -c {s['ab_concurrency']}; "
           f"curl {s['download_mb']} MB; iperf3 -t {s['iperf_seconds']}, one stream", ""]
    head = ("figure", "unit", "ustack", "reference", "ref value", "ratio", "target", "met")
    rows = [head] + [(r["figure"], r["unit"], number(r["ustack"]), r["reference"] or "—",
                      number(r["reference_value"]), number(r["ratio"]), r["target"] or "",
                      {True: "met", False: "NOT MET", None: ""}[r["met"]])
                     for r in report["metrics"]]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) if j in (0, 1, 3, 6, 7) else str(c).rjust(w)
                             for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    if report["raw"].get("budget_ping"):
        out += [""] + budget_lines("latency budget of a ping (stackctl latency):", report["raw"]["budget_ping"])
    for w in report["warnings"]:
        out.append(f"warning: {w}")
    for e in report["errors"]:
        out.append(f"error: {e}")
    return "\n".join(out)
