"""Load generation for benchmarks/serving.py: closed loop from a separate process.

``wrk`` (C, one thread, epoll) is used when it is on PATH: at a few thousand
requests/s it takes a few percent of one core, where a Python client would take a
large share of the two cores it shares with the server. Each of its ``-c``
connections sends the next request as soon as the previous answer arrives
(closed loop); a Lua script sets the POST body and prints the counts and latency
percentiles as JSON. Without wrk, this file run as a script is the fallback: an
asyncio client with one keep-alive connection per concurrent user, pre-encoded
requests and minimal response parsing, in its own process.

:func:`sequential` is the time-split probe: one keep-alive connection, one request
at a time, from the calling process. :func:`cpu_split` runs a closed loop while it
reads every process's CPU time from ``/proc``: CPU milliseconds a request by process
class.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from urllib.parse import urlsplit

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, ' ..
    '"mean_us": %%.1f, "max_us": %%d, "errors_status": %%d, "errors_socket": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def loadgen_name() -> str:
    return "wrk" if shutil.which("wrk") else "python-asyncio"


def wrk_version() -> str | None:
    if not shutil.which("wrk"):
        return None
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (out.stdout + out.stderr).splitlines()[0].strip()


def closed_loop(url: str, body: bytes, concurrency: int, duration: float, timeout: float = 10):
    """Run one closed-loop measurement; returns counts, latency percentiles (ms) and errors."""
    if shutil.which("wrk"):
        result = _wrk(url, body, concurrency, duration, timeout)
    else:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            f.write(body)
            f.flush()
            cmd = [sys.executable, __file__, url, f.name, str(concurrency), str(duration)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
            result = _parse(out.stdout, out.stderr)
    seconds = result["duration_us"] / 1e6
    return {
        "requests": result["requests"],
        "duration_s": round(seconds, 3),
        "rps": result["requests"] / seconds if seconds else 0.0,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "mean_ms": result["mean_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
        "errors": result["errors_status"] + result["errors_socket"],
        "errors_status": result["errors_status"],
        "errors_socket": result["errors_socket"],
    }


def _wrk(url: str, body: bytes, concurrency: int, duration: float, timeout: float) -> dict:
    text = body.decode()
    assert "]==]" not in text
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(LUA % text)
        script.flush()
        cmd = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            f"--timeout={int(timeout)}s",
            "-s",
            script.name,
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    return _parse(out.stdout, out.stderr)


def _parse(stdout: str, stderr: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"load generator gave no result: {stdout[-500:]} {stderr[-500:]}")


def sequential(url: str, body: bytes | None, n: int, warmup: int = 20) -> dict:
    """``n`` requests one after another on one keep-alive connection: latency in ms.

    A POST of ``body``, or a GET when ``body`` is None."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    times = []
    errors = 0
    first_error = ""
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            if body is None:
                conn.request("GET", parts.path)
            else:
                conn.request("POST", parts.path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
                if not 200 <= resp.status < 300:
                    errors += 1
                    first_error = first_error or f"HTTP {resp.status}: {data[:200]!r}"
    finally:
        conn.close()
    times.sort()
    return {
        "n": n,
        "p50_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "mean_ms": statistics.fmean(times),
        "errors": errors,
        **({"first_error": first_error} if errors else {}),
    }


# --- CPU time by process during a closed loop -------------------------------------------

HZ = os.sysconf("SC_CLK_TCK")

# Ray renames its workers (setproctitle): a process is classified by its latest command
# line, first match wins. Only processes of the cluster's sessions get these classes.
RAY_CLASSES = (
    ("ray::ServeReplica:rayship:", "replicas (rayship)"),
    ("ray::ServeReplica:", "replicas (probe apps)"),
    ("ray::HAProxyManager", "HAProxy manager actor"),
    ("ray::ServeController", "Serve controller"),
    ("ray::ProxyActor", "Serve proxy actor"),
    ("/raylet/raylet", "raylet"),
    ("gcs_server", "GCS"),
    ("ray::DashboardAgent", "dashboard agent"),
    ("ray::RuntimeEnvAgent", "runtime-env agent"),
    ("ray-dashboard-", "dashboard head modules"),
    ("dashboard/dashboard.py", "dashboard head"),
    ("log_monitor.py", "log monitor"),
    ("autoscaler/_private/monitor.py", "autoscaler monitor"),
    ("ray.util.client.server", "Ray client server"),
    ("ray::IDLE", "idle Ray workers"),
)


def _proc_times() -> dict[int, tuple[int, int]]:
    """pid -> (session id, utime + stime in clock ticks) of every process now."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3 (state) on
        out[int(name)] = (int(fields[3]), int(fields[11]) + int(fields[12]))
    return out


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _machine_busy() -> int:
    """Busy clock ticks of the whole machine (all CPUs) from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return user + nice + system + irq + softirq + steal


def classify(cmdline: str, sid: int, cluster_sids: Collection[int], me: int, pid: int) -> str:
    """The process class of one process (see RAY_CLASSES)."""
    if pid == me:
        return "benchmark process (sampler)"
    first = cmdline.split(" ", 1)[0]
    if sid in cluster_sids:
        if os.path.basename(first) == "haproxy":
            return "haproxy"
        for needle, name in RAY_CLASSES:
            if needle in cmdline:
                return name
        return "other Ray processes"
    if os.path.basename(first) == "wrk":
        return "wrk (load generator)"
    if "uvicorn" in cmdline:
        return "uvicorn"
    return "outside the cluster (other work)"


class _Sampler(threading.Thread):
    """Reads every process's CPU time every ``interval`` s: a process that exits during
    the run (HAProxy replaces itself on each reload) keeps what it was last seen using;
    one that starts during the run counts from zero."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.first = _proc_times()
        self.last = dict(self.first)
        self.cmd = {pid: _cmdline(pid) or "" for pid in self.first}
        self.stop = threading.Event()

    def sample(self) -> None:
        for pid, value in _proc_times().items():
            if pid not in self.last:
                self.cmd[pid] = _cmdline(pid) or ""
            self.last[pid] = value

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.sample()
        for pid in self.last:  # the latest command line of those still alive
            self.cmd[pid] = _cmdline(pid) or self.cmd.get(pid, "")


def cpu_split(
    run: Callable[[], dict],
    cluster_sids: Collection[int],
    interval: float = 0.25,
) -> dict:
    """Run ``run`` (a closed loop returning ``requests``) while accounting CPU time.

    Returns ``run``'s result plus ``wall_s``, ``cpu_ms`` (process class -> CPU ms over the
    run, all processes of that class together), ``machine_busy_ms`` (all CPUs, from
    /proc/stat: includes kernel interrupt work no process is charged with) and
    ``processes`` (class -> how many pids took CPU). ``cluster_sids``: the session ids of
    the Ray cluster's process trees (everything a ``ray start`` started, HAProxy too).
    """
    me = os.getpid()
    sampler = _Sampler(interval)
    busy0, t0 = _machine_busy(), time.monotonic()
    sampler.start()
    try:
        result = run()
    finally:
        sampler.finish()
    wall, busy1 = time.monotonic() - t0, _machine_busy()
    cpu: dict[str, float] = {}
    pids: dict[str, int] = {}
    for pid, (sid, ticks) in sampler.last.items():
        used = ticks - sampler.first.get(pid, (sid, 0))[1]
        if used <= 0:
            continue
        name = classify(sampler.cmd.get(pid, ""), sid, cluster_sids, me, pid)
        cpu[name] = cpu.get(name, 0.0) + used * 1000 / HZ
        pids[name] = pids.get(name, 0) + 1
    return {
        **result,
        "wall_s": round(wall, 3),
        "cpu_ms": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
        "machine_busy_ms": (busy1 - busy0) * 1000 / HZ,
        "processes": pids,
    }


# --- the Python fallback load generator (run as a script) ---------------------------------


async def _user(host, port, request: bytes, stop: float, latencies: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length, chunked = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while size := int((await reader.readline()).strip(), 16):
                    await reader.readexactly(size + 2)
                await reader.readline()
            else:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if status >= 400:
                errors[0] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        errors[1] += 1
    finally:
        writer.close()


async def _run(url: str, body: bytes, concurrency: int, duration: float) -> dict:
    parts = urlsplit(url)
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors = [0, 0]
    t0 = time.perf_counter()
    stop = t0 + duration
    await asyncio.gather(
        *(
            _user(parts.hostname, parts.port, request, stop, latencies, errors)
            for _ in range(concurrency)
        )
    )
    elapsed = time.perf_counter() - t0
    latencies.sort()

    def pct(q: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6)

    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": pct(0.5) if latencies else 0,
        "p99_us": pct(0.99) if latencies else 0,
        "mean_us": statistics.fmean(latencies) * 1e6 if latencies else 0.0,
        "max_us": int(latencies[-1] * 1e6) if latencies else 0,
        "errors_status": errors[0],
        "errors_socket": errors[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="closed-loop HTTP load (wrk fallback)")
    parser.add_argument("url")
    parser.add_argument("body", type=Path)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("duration", type=float)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(_run(args.url, args.body.read_bytes(), args.concurrency, args.duration))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
