"""The stack's HTTP file service against ``python -m http.server`` on the kernel's loopback: requests
per second (``ab``) for a small page, and one large download (``curl``)."""

from __future__ import annotations

import re

from tests.integration.netns import STACK_ADDR, Namespace

from .common import LOOPBACK, MB, BenchError, median, say
from .references import HTTP_REF_PORT
from .run import Run


def ab_rate(ns: Namespace, url: str, requests: int, concurrency: int) -> dict:
    """ab -n requests -c concurrency: requests per second, and every request must succeed."""
    done = ns.run("ab", "-q", "-n", str(requests), "-c", str(concurrency), url, check=False, timeout=600)
    out = done.stdout.decode(errors="replace")
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    complete = re.search(r"Complete requests:\s+(\d+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if done.returncode != 0 or not (rate and complete and failed):
        raise BenchError(f"ab {url}: exit {done.returncode}: {(out + done.stderr.decode(errors='replace'))[-300:]}")
    bad = int(failed.group(1)) + (int(non2xx.group(1)) if non2xx else 0)
    if int(complete.group(1)) != requests or bad:
        raise BenchError(f"ab {url}: {complete.group(1)} of {requests} complete, {bad} failed or not 2xx")
    return {"rate": float(rate.group(1)), "requests": requests}


def curl_download(ns: Namespace, url: str, size: int) -> dict:
    """One download with curl to /dev/null: Mbit/s over curl's own total time; the size must match."""
    done = ns.run("curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url,
                  check=False, timeout=300)
    try:
        got, seconds = done.stdout.decode().split()
    except ValueError:
        raise BenchError(f"curl {url}: {done.stderr.decode(errors='replace')[-300:]}") from None
    if int(got) != size:
        raise BenchError(f"curl {url}: {got} bytes of {size}")
    return {"mbit_s": size * 8 / float(seconds) / 1e6, "seconds": float(seconds)}


def _targets(run: Run) -> dict[str, tuple[Namespace, str]]:
    return {"ustack": (run.stack_ns, f"http://{STACK_ADDR}"),
            "kernel_loopback": (run.kern_ns, f"http://{LOOPBACK}:{HTTP_REF_PORT}")}


def measure_ab(run: Run) -> None:
    """One ab run per target on the small page."""
    for who, (ns, base) in _targets(run).items():
        r = ab_rate(ns, f"{base}/index.txt", run.s.ab_requests, run.s.ab_concurrency)
        run.raw[f"http_ab_{who}"] = r
        say(f"  ab -n {run.s.ab_requests} -c {run.s.ab_concurrency}, {who}: {r['rate']:.0f} requests/s")


def measure_download(run: Run) -> None:
    """The large file with curl, once per repetition per target."""
    targets = _targets(run)
    size = run.s.download_mb * MB
    reps: dict[str, list[dict]] = {k: [] for k in targets}
    for _ in range(run.s.repetitions):
        for who, (ns, base) in targets.items():
            reps[who].append(curl_download(ns, f"{base}/download.bin", size))
    for who, r in reps.items():
        run.raw[f"http_download_{who}"] = {"mbit_s": median([x["mbit_s"] for x in r]), "repetitions": r}
        say(f"  curl {run.s.download_mb} MB, {who}: {run.raw[f'http_download_{who}']['mbit_s']:.0f} Mbit/s")
