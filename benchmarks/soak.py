"""Soak: constant load at ~70% of measured capacity for 10 minutes, a promote half-way.

What a user runs, from a scratch working directory (``benchmarks/results/tmp/soak``,
ignored by git): two versions of a churn classifier (5 features, two categorical;
scikit-learn LogisticRegression with C 1.0 and 0.1) are fitted and registered the way
``training.pipeline`` registers a winner (ONNX graph with the preprocessing inside,
schema, profile, spec and drift reference), ``production`` on version 1; then
``rayship up --workers 0`` (one head node with all cores, Serve's native ingress:
HAProxy in front of each replica's own HTTP server) and ``rayship serve
NAME@production``. The spec's serve section fixes the replica count (``min_replicas =
max_replicas = 2``, one CPU each: the default spec autoscales 1..4, and a replica
that comes and goes would make "memory of every replica" meaningless); everything
else is the spec's default, the drift monitor included (every request sampled).

1. **Capacity**: closed-loop ``wrk`` (``serving_load.closed_loop``) at each
   ``--capacity-concurrency`` for ``--capacity-seconds`` after a short warm-up; the
   capacity is the best throughput.
2. **Soak**: an *open-loop* constant rate of ``--load`` x capacity for ``--minutes``.
   wrk has no constant-rate mode (wrk2 has, and is not packaged here), so a Lua
   script gives it one: ``delay()`` hands each connection the next slot of one fixed
   schedule (slot *i* at ``T + i / rate``, clock_gettime through LuaJIT's FFI),
   so requests go out at the rate whatever the latency, as long as one of the
   ``--connections`` (256) is free; how late a slot went out is recorded (late: all
   connections were waiting for answers; the slot is then sent at once, catching up
   as wrk2 does). Latency is measured from the actual send, so a late slot's wait is
   not in it: the late counts say how often that happened. Each request is one row,
   taken in turn from 64 holdout rows. The soak runs as one wrk process a
   ``--segment`` (60 s: latency percentiles a minute); segment *k+1*'s wrk connects
   while segment *k*'s is still sending and takes over at the next slot; each wrk
   stops sending at its segment's end (slots still due then are *unsent*: the load
   was not held) and waits 5 s for the answers. So the load never pauses and every
   request sent is accounted for: answered (2xx or not), a socket error or a timeout,
   or *lost* (no answer within 5 s of the segment's end: should be 0). Every
   response's ``model_version`` is counted, per second.
3. **Memory**: every ``--sample-every`` s, psutil reads RSS and USS of every process
   of the cluster's sessions (``.rayship/cluster.json``), classified by Ray's process
   title (the replicas, HAProxy, the HAProxy manager actor, the Serve controller, the
   Serve proxy actor, the drift merger actor; Ray's own daemons are listed too, for
   the record). A process's level after warm-up is the median of its samples in the
   ``--baseline-seconds`` after ``--warmup``; its drift is the largest deviation of a
   later sample from that level (and the end: the median of the last
   ``--baseline-seconds``), in %.
4. **Promote**: at ``--promote-at`` of the soak, ``rayship models promote NAME 2`` (the
   CLI a user runs: moves the alias and reconfigures the running replicas in place).
   The per-second version counts show the switch; the check: no error anywhere, no
   version-1 answer after the command returned, version 2 only from then on.

Verdict (printed and in the JSON): zero errors and zero lost requests, every Serve
process within ``--memory-tolerance`` (10%) of its level after warm-up, the promote
lost nothing.

    flock /tmp/rayship-cpu.lock .venv/bin/python benchmarks/soak.py [--quick] [--minutes 10]

``--quick``: a 1-minute soak (warm-up 20 s, promote at 30 s, 10-s segments) to check
the script. Writes ``soak.json``, ``soak.md`` and ``soak.png`` (``--quick``:
``soak-quick.*``) under ``--out-dir`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import benchlib  # noqa: E402
from benchmarks import serving_load as load  # noqa: E402

SCRATCH = ROOT / "benchmarks" / "results" / "tmp" / "soak"
BIN = Path(sys.executable).parent
NAME = "churn-soak"
REPLICAS = 2
BODIES = 64  # distinct one-row bodies, sent in turn
DRAIN_S = 5.0  # a segment's wrk waits this long for answers after its end (then: lost)
LEAD_S = 1.0  # a segment's wrk starts this long before its first slot (to connect)
LATE_S = 0.05  # a slot sent later than this after its time counts as late

# Serve processes (the verdict) by Ray process title; first match wins. Others of the
# cluster's sessions are recorded under serving_load's classes.
SERVE_CLASSES = (
    ("ray::ServeReplica:", "replica"),
    ("ray::HAProxyManager", "HAProxy manager actor"),
    ("ray::ServeController", "Serve controller"),
    ("ray::ProxyActor", "Serve proxy actor"),
    ("ray::DriftMerger", "drift merger actor"),
)
HAPROXY = "haproxy"

LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } soak_timespec;
int clock_gettime(int clk, soak_timespec *tp);
]]
local ts = ffi.new("soak_timespec")
local function now()  -- CLOCK_MONOTONIC: Python's time.monotonic()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

-- per-thread state (one thread: -t1)
bodies = {BODIES}
reqs = {}
interval, t_start, t_end, n_slots, slot = 0, 0, 0, 0, 0
sent, unsent, late, late_max = 0, 0, 0, 0
statuses, versions, first_seen, last_seen = {}, {}, {}, {}
ticks = {}
answered, dumped = 0, -1

-- wrk's thread:get() garbles string keys of a copied table (wrk 4.1): the thread
-- writes its tables itself, as a STATE line each time a connection goes idle after
-- the segment with new answers since the last one; the last line has them all.
local function enc(tbl)
  local parts = {}
  for k, v in pairs(tbl) do
    table.insert(parts, string.format('"%s": %.17g', k, v))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function dump()
  if answered == dumped then return end
  dumped = answered
  io.write(string.format(
    'STATE {"statuses": %s, "versions": %s, "first_seen": %s, "last_seen": %s, ' ..
    '"ticks": %s}\n', enc(statuses), enc(versions), enc(first_seen), enc(last_seen),
    enc(ticks)))
end

function init(args)
  local rate = tonumber(args[1])
  t_start = tonumber(args[2])
  t_end = t_start + tonumber(args[3])
  n_slots = math.floor(rate * tonumber(args[3]) + 0.5)
  interval = 1.0 / rate
  for i, body in ipairs(bodies) do
    reqs[i] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
  end
end

function delay()
  if slot >= n_slots then  -- this segment is done: stay idle
    dump()
    return 3600000
  end
  local t = now()
  if t >= t_end then  -- behind at the segment's end: the slots left are not sent
    unsent = unsent + n_slots - slot
    slot = n_slots
    dump()
    return 3600000
  end
  local due = t_start + slot * interval
  slot = slot + 1
  local wait = due - t
  if wait <= 0 then
    if -wait > late_max then late_max = -wait end
    if -wait > LATE_S then late = late + 1 end
    return 0
  end
  return math.floor(wait * 1000)
end

function request()  -- wrk calls it once more at start (script_verify_request): not sent
  sent = sent + 1
  return reqs[(sent - 1) % #reqs + 1]
end

function response(status, headers, body)
  local t = now()
  answered = answered + 1
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  local v = "error"
  if status >= 200 and status < 300 then
    v = string.match(body, '"model_version"%s*:%s*"([^"]*)"') or "missing"
  end
  versions[v] = (versions[v] or 0) + 1
  if first_seen[v] == nil then first_seen[v] = t end
  last_seen[v] = t
  local key = string.format("%d/%s", math.floor(t), v)  -- flat: wrk copies no nested table
  ticks[key] = (ticks[key] or 0) + 1
end

function done(summary, latency, requests)
  local t = threads[1]
  local e = summary.errors
  io.write(string.format(
    'RESULT {"answered": %d, "duration_us": %d, "sent": %d, "unsent": %d, "late": %d, ' ..
    '"late_max_s": %.4f, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f, ' ..
    '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status_errors": %d}\n',
    summary.requests, summary.duration, t:get("sent") - 1, t:get("unsent"), t:get("late"),
    t:get("late_max"),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    e.connect, e.read, e.write, e.timeout, e.status))
end
"""


# ------------------------------------------------------------------------ processes

_CLUSTER: list[Path] = []
_WRK: list[subprocess.Popen] = []


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    return env


def rayship(args: list[str], timeout: float = 400) -> tuple[str, float]:
    """Run the ``rayship`` CLI in the scratch directory; its output and wall seconds."""
    t0 = time.monotonic()
    out = subprocess.run(
        [str(BIN / "rayship"), *args],
        cwd=SCRATCH,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"rayship {' '.join(args)}: {(out.stdout + out.stderr)[-1500:]}")
    return out.stdout, time.monotonic() - t0


def _cleanup() -> None:
    for proc in _WRK:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if _CLUSTER:
        with contextlib.suppress(Exception):
            rayship(["down"], timeout=120)
        _CLUSTER.clear()


def _on_signal(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------- models


def register_versions(folder: Path, log) -> tuple[str, list[bytes]]:
    """Fit and register two versions (``production`` on 1); the tracking URI and the
    request bodies (one holdout row each, as a client sends it)."""
    from services.deploy import as_instances
    from services.http import dumps

    uri = f"sqlite:///{folder / '.rayship' / 'mlflow.db'}"
    (folder / ".rayship").mkdir(parents=True, exist_ok=True)
    splits = benchlib.register_churn(
        folder,
        uri,
        NAME,
        cs=(1.0, 0.1),
        serve={"min_replicas": REPLICAS, "max_replicas": REPLICAS},
        benchmark="soak",
        log=log,
    )
    rows = splits.X_test.head(BODIES).to_dict(orient="records")
    return uri, [dumps({"instances": as_instances([r])}) for r in rows]


# ----------------------------------------------------------------------------- load


def capacity(url: str, body: bytes, concurrencies: list[int], seconds: float, log) -> dict:
    """Closed-loop throughput at each concurrency (after a warm-up); the best is capacity."""
    load.closed_loop(url, body, max(concurrencies), 5)  # warm-up, not counted
    runs = []
    for c in concurrencies:
        run = load.closed_loop(url, body, c, seconds)
        run["concurrency"] = c
        runs.append(run)
        log(
            f"  capacity c={c}: {run['rps']:.0f} req/s, p50 {run['p50_ms']:.1f} ms, "
            f"p99 {run['p99_ms']:.1f} ms, errors {run['errors']}"
        )
    best = max(runs, key=lambda r: r["rps"])
    return {"rps": round(best["rps"], 1), "concurrency": best["concurrency"], "runs": runs}


def _lua(bodies: list[bytes]) -> str:
    texts = [b.decode() for b in bodies]
    if any("]==]" in t for t in texts):
        raise ValueError("a body contains the Lua long-string delimiter")
    listed = ",\n".join(f"[==[{t}]==]" for t in texts)
    return LUA.replace("{BODIES}", "{" + listed + "}").replace("LATE_S", repr(LATE_S))


@dataclass
class Segment:
    """One wrk process: the slots of ``[start, start + seconds)`` at ``rate``."""

    index: int
    start: float  # time.monotonic() of its first slot
    seconds: float
    rate: float
    proc: subprocess.Popen | None = None
    stdout: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)


def launch(seg: Segment, url: str, script: Path, connections: int, timeout_s: int) -> None:
    """Start the segment's wrk (it waits for its first slot)."""
    duration = math.ceil(seg.start - time.monotonic() + seg.seconds + DRAIN_S)
    seg.stdout = SCRATCH / "logs" / f"wrk-{seg.index:03d}.out"
    seg.stdout.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        url,
        "--",
        repr(seg.rate),
        repr(seg.start),
        repr(seg.seconds),
    ]
    with open(seg.stdout, "wb") as out:
        seg.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    _WRK.append(seg.proc)


def _ticks(flat: dict[str, int]) -> dict[int, dict[str, int]]:
    """``{"SECOND/VERSION": n}`` (as the Lua script keeps it) as ``{second: {version: n}}``."""
    out: dict[int, dict[str, int]] = {}
    for key, n in flat.items():
        sec, version = key.split("/", 1)
        out.setdefault(int(sec), {})[version] = int(n)
    return dict(sorted(out.items()))


def collect(seg: Segment) -> dict[str, Any]:
    """Wait for the segment's wrk and summarise it (latency in ms)."""
    assert seg.proc is not None and seg.stdout is not None
    seg.proc.wait()
    text = seg.stdout.read_text(errors="replace")
    lines = text.splitlines()
    raw = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    if raw is None:
        raise RuntimeError(f"wrk segment {seg.index} gave no result: {text[-800:]}")
    states = [line for line in lines if line.startswith("STATE ")]
    empty = {"statuses": {}, "versions": {}, "first_seen": {}, "last_seen": {}, "ticks": {}}
    raw.update(json.loads(states[-1][6:]) if states else empty)
    socket = raw["connect"] + raw["read"] + raw["write"]
    # A request was sent once request() built it; a connect error comes before that.
    non2xx = sum(n for s, n in raw["statuses"].items() if not 200 <= int(s) < 300)
    seg.result = {
        "index": seg.index,
        "start_s": seg.start,
        "seconds": seg.seconds,
        "target_rps": seg.rate,
        "sent": raw["sent"],
        "unsent": raw["unsent"],
        "answered": raw["answered"],
        "rps": raw["answered"] / seg.seconds,
        "non_2xx": non2xx,
        "socket_errors": socket,
        "timeouts": raw["timeout"],
        "lost": raw["sent"] - raw["answered"] - raw["read"] - raw["write"],
        "late_slots": raw["late"],
        "late_max_ms": round(raw["late_max_s"] * 1000, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "statuses": raw["statuses"],
        "versions": raw["versions"],
        "first_seen": raw["first_seen"],
        "last_seen": raw["last_seen"],
        "ticks": _ticks(raw["ticks"]),
    }
    return seg.result


# --------------------------------------------------------------------------- memory


def classify(cmdline: str) -> str:
    """A Serve process's role from its command line / Ray process title, else
    serving_load's class (Ray's daemons), else "other"."""
    first = cmdline.split(" ", 1)[0]
    if os.path.basename(first) == HAPROXY:
        return HAPROXY
    for needle, name in SERVE_CLASSES:
        if needle in cmdline:
            return name
    for needle, name in load.RAY_CLASSES:
        if needle in cmdline:
            return name
    return "other"


SERVE_ROLES = {name for _, name in SERVE_CLASSES} | {HAPROXY}


class MemorySampler(threading.Thread):
    """RSS and USS (MiB) of every process of the cluster's sessions every ``interval`` s,
    and how the machine's CPUs were used over the interval (shares of all its cores):
    busy in all, by the cluster's processes, by the load generator (wrk) and this
    process, and by everything else (``other``: work on the machine that is not the
    soak's, which competes with the endpoint)."""

    def __init__(self, sessions: set[int], interval: float):
        super().__init__(daemon=True)
        self.sessions, self.interval = sessions, interval
        self.samples: list[dict[str, Any]] = []
        self.roles: dict[int, str] = {}
        self.stop = threading.Event()
        self._busy = benchlib.machine_busy_s()
        self._at = time.monotonic()
        self._cpu: dict[int, float] = {}

    def sample(self) -> None:
        import psutil

        now = time.monotonic()
        busy = benchlib.machine_busy_s()
        procs: dict[str, dict[str, float]] = {}
        used = {"cluster": 0.0, "load": 0.0}
        by_role: dict[str, float] = {}
        cpu: dict[int, float] = {}
        me = os.getpid()
        for proc in psutil.process_iter(["name"]):
            try:
                mine = proc.pid == me or proc.info["name"] == "wrk"
                if not mine and os.getsid(proc.pid) not in self.sessions:
                    continue
                times = proc.cpu_times()
                cpu[proc.pid] = times.user + times.system
                part = cpu[proc.pid] - self._cpu.get(proc.pid, cpu[proc.pid])
                used["load" if mine else "cluster"] += part
                if mine:
                    continue
                role = classify(" ".join(proc.cmdline()))
                by_role[role] = by_role.get(role, 0.0) + part
                if role == "idle Ray workers":
                    continue
                mem = proc.memory_full_info()
            except (psutil.Error, OSError):
                continue
            self.roles[proc.pid] = role
            procs[str(proc.pid)] = {
                "rss": round(mem.rss / 2**20, 2),
                "uss": round(mem.uss / 2**20, 2),
            }
        span = max(now - self._at, 1e-6) * benchlib.cores()
        machine = (busy - self._busy) / span
        cluster, gen = used["cluster"] / span, used["load"] / span
        self.samples.append(
            {
                "t": now,  # time.monotonic(); made relative to the soak's start after it
                "cpu_busy": round(machine, 3),
                "cpu_cluster": round(cluster, 3),
                "cpu_load_generator": round(gen, 3),
                "cpu_other": round(max(0.0, machine - cluster - gen), 3),
                "cpu_by_role": {k: round(v / span, 3) for k, v in by_role.items() if v > 0},
                "procs": procs,
            }
        )
        self._busy, self._at, self._cpu = busy, now, cpu

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.sample()


def _series(sampler: MemorySampler) -> dict[str, dict[str, Any]]:
    """Per process: (t, RSS, USS) points, keyed by pid, except HAProxy: one series
    "haproxy" that follows the newest HAProxy process. Serve's HAProxy manager reloads
    HAProxy when the replicas' targets change (the promote does): a new process takes
    the listening socket, the old one finishes its connections and exits; the series
    is what serves at each sample, and the pids it went through are listed."""
    series: dict[str, dict[str, Any]] = {}
    born: dict[str, float] = {}
    for s in sampler.samples:
        for pid in s["procs"]:
            born.setdefault(pid, s["t"])
    for s in sampler.samples:
        live_haproxy = [p for p in s["procs"] if sampler.roles[int(p)] == HAPROXY]
        newest = max(live_haproxy, key=lambda p: (born[p], int(p)), default=None)
        for pid, m in s["procs"].items():
            role = sampler.roles[int(pid)]
            if role == HAPROXY and pid != newest:
                continue
            key = HAPROXY if role == HAPROXY else pid
            entry = series.setdefault(key, {"role": role, "pids": [], "points": [], "since": {}})
            if int(pid) not in entry["pids"]:
                entry["pids"].append(int(pid))
                entry["since"][pid] = s["t"]
            entry["points"].append((s["t"], m["rss"], m["uss"]))
    return series


def memory_report(
    sampler: MemorySampler, warmup: float, baseline_s: float, end_s: float, tolerance: float
) -> list[dict[str, Any]]:
    """Per process: its level after warm-up, max, min, end, and drift in % (see module doc)."""
    last_t = max((s["t"] for s in sampler.samples), default=0.0)
    out = []
    series = _series(sampler)
    for _, one in sorted(series.items(), key=lambda kv: (kv[1]["role"], kv[0])):
        role, points = one["role"], one["points"]
        after = [p for p in points if p[0] >= warmup]
        base = [p for p in after if p[0] < warmup + baseline_s]
        entry: dict[str, Any] = {
            "pid": one["pids"][-1],
            "pids": one["pids"],
            "serving_since_s": one["since"],  # HAProxy: when each reload took over
            "role": role,
            "serve": role in SERVE_ROLES,
            "first_seen_s": points[0][0],
            "last_seen_s": points[-1][0],
            "alive_at_end": points[-1][0] >= last_t - 0.01,
        }
        if not base:  # started after the baseline window (or never seen after warm-up)
            entry["note"] = "no sample in the baseline window"
            out.append(entry)
            continue
        tail = [p for p in after if p[0] >= last_t - end_s] or after[-1:]
        for i, name in ((1, "rss"), (2, "uss")):
            level = statistics.median(p[i] for p in base)
            values = [p[i] for p in after]
            end = statistics.median(p[i] for p in tail)
            drift = max(abs(v - level) for v in values) / level * 100 if level else 0.0
            entry[name] = {
                "after_warmup_mib": round(level, 1),
                "max_mib": round(max(values), 1),
                "min_mib": round(min(values), 1),
                "end_mib": round(end, 1),
                "max_drift_pct": round(drift, 2),
                "end_drift_pct": round((end - level) / level * 100 if level else 0.0, 2),
            }
        entry["within_tolerance"] = entry["rss"]["max_drift_pct"] <= tolerance
        if entry["serve"]:
            entry["points"] = [[p[0], p[1]] for p in points]  # (t, RSS MiB) for the plot
        out.append(entry)
    return out


# ---------------------------------------------------------------------------- promote


class Promoter(threading.Thread):
    """``rayship models promote NAME VERSION`` at monotonic time ``at``."""

    def __init__(self, at: float, version: str):
        super().__init__(daemon=True)
        self.at, self.version = at, version
        self.result: dict[str, Any] = {}

    def run(self) -> None:
        time.sleep(max(0.0, self.at - time.monotonic()))
        started = time.monotonic()
        try:
            out, wall = rayship(["models", "promote", NAME, self.version], timeout=300)
            self.result = {"ok": True, "output": out.strip()}
        except Exception as exc:
            self.result = {"ok": False, "output": str(exc)}
        self.result.update(started=started, ended=time.monotonic(), version=self.version)


def promote_check(segments: list[dict], promote: dict, old: str, new: str) -> dict[str, Any]:
    """Did answers switch from ``old`` to ``new`` with nothing lost? (times: monotonic)"""
    first_new = min(
        (s["first_seen"][new] for s in segments if new in s["first_seen"]),
        default=None,
    )
    last_old = max((s["last_seen"][old] for s in segments if old in s["last_seen"]), default=None)
    others = sorted({v for s in segments for v in s["versions"]} - {old, new})
    window = [
        s for s in segments if s["start_s"] <= promote["ended"] and
        s["start_s"] + s["seconds"] + DRAIN_S >= promote["started"]
    ]  # fmt: skip
    failed = sum(s["non_2xx"] + s["socket_errors"] + s["timeouts"] + s["lost"] for s in window)
    late_old = last_old is not None and last_old > promote["ended"]
    ok = (
        promote.get("ok", False)
        and failed == 0
        and first_new is not None
        and not late_old
        and not others
    )
    return {
        "command": f"rayship models promote {NAME} {new}",
        "ok": bool(ok),
        "command_ok": promote.get("ok", False),
        "output": promote.get("output", ""),
        "started_s": promote["started"],
        "command_s": round(promote["ended"] - promote["started"], 2),
        "first_new_answer_s": first_new,
        "last_old_answer_s": last_old,
        "old_answers_after_command": bool(late_old),
        "both_versions_for_s": (
            round(last_old - first_new, 3)
            if first_new is not None and last_old is not None
            else None
        ),
        "failed_requests_in_promote_segments": failed,
        "other_versions_seen": others,
    }


# ------------------------------------------------------------------------------ plot


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result["soak_start_monotonic_s"]  # the ticks are seconds of time.monotonic()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ticks: dict[int, dict[str, int]] = {}
    for seg in result["segments"]:
        for sec, versions in seg["ticks"].items():
            into = ticks.setdefault(int(sec), {})
            for v, n in versions.items():
                into[v] = into.get(v, 0) + n
    secs = sorted(ticks)[1:-1]  # first and last second are partial
    versions = sorted({v for t in ticks.values() for v in t})
    for v in versions:
        label = f"version {v}" if v not in ("error", "missing") else v
        ax1.plot(
            [s + 0.5 - t0 for s in secs], [ticks[s].get(v, 0) for s in secs], label=label, lw=0.6
        )
    ax1.axhline(result["target_rps"], color="grey", ls=":", lw=0.8, label="target rate")
    ax1.set_ylabel("answers a second")
    ax1.legend(loc="lower left", fontsize=8)
    for entry in result["memory"]:
        if not entry["serve"] or "rss" not in entry:
            continue
        points, level = entry["points"], entry["rss"]["after_warmup_mib"]
        ax2.plot(
            [p[0] for p in points],
            [100 * (p[1] / level - 1) for p in points],
            lw=1,
            label=f"{entry['role']} ({entry['pid']}, {level:.0f} MiB)",
        )
    tol = result["config"]["memory_tolerance_pct"]
    for y in (tol, -tol):
        ax2.axhline(y, color="grey", ls=":", lw=0.8)
    ax2.set_ylim(-1.5 * tol, 1.5 * tol)
    ax2.set_ylabel("RSS vs. its level after warm-up (%)")
    ax2.set_xlabel("seconds since the soak started")
    ax2.legend(loc="lower right", fontsize=7, ncol=2)
    for ax in (ax1, ax2):
        ax.axvline(result["config"]["warmup_s"], color="grey", ls="--", lw=0.8)
        ax.axvline(result["promote"]["started_s"], color="red", ls="--", lw=0.8)
    ax1.set_title(
        "soak: answers a second by version; RSS of the Serve processes "
        "(dashed: end of warm-up, promote)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict[str, Any], png: str) -> str:
    cfg, v = result["config"], result["verdict"]
    tot = result["totals"]
    pr = result["promote"]
    cpu = result["cpu_during_soak"]
    lines = [
        f"Soak: {cfg['minutes']} min at {cfg['load']:.0%} of capacity "
        f"({result['target_rps']:.0f} req/s of {result['capacity']['rps']:.0f}), "
        f"{result['endpoint']['replicas']} replicas, native ingress, one row a request.",
        "",
        f"- Requests: {tot['sent']} sent ({tot['unsent']} slots not sent: the endpoint "
        f"behind at a segment's end), {tot['answered']} answered, "
        f"{tot['non_2xx']} non-2xx, {tot['socket_errors']} socket errors, "
        f"{tot['timeouts']} timeouts, {tot['lost']} lost; "
        f"{tot['late_slots']} slots sent over {LATE_S * 1000:.0f} ms late "
        f"(latest {tot['late_max_ms']} ms).",
        f"- CPU during the soak (shares of {result['machine']['cores']} cores): busy "
        f"{cpu['busy']:.0%}, the cluster {cpu['cluster']:.0%}, wrk and this script "
        f"{cpu['load_generator']:.0%}, other work on the machine {cpu['other']:.0%}.",
        f"- Promote at {pr['started_s'] - result['soak_start_s']:.0f} s "
        f"(`{pr['command']}`, {pr['command_s']} s): both versions answered for "
        f"{pr['both_versions_for_s']} s, {pr['failed_requests_in_promote_segments']} failed "
        f"requests, version 1 after the command returned: {pr['old_answers_after_command']}.",
        f"- Verdict: errors 0: **{v['errors_zero']}**; every Serve process within "
        f"{cfg['memory_tolerance_pct']:.0f}%: **{v['memory_within_tolerance']}**; "
        f"promote lost nothing: **{v['promote_lost_nothing']}**; the load held (every slot "
        f"sent): **{v['load_held']}** → **{'PASS' if v['pass'] else 'FAIL'}**.",
        "",
        "| minute | answered | req/s | p50 ms | p99 ms | p99.9 ms | max ms | failed | versions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["segments"]:
        failed = s["non_2xx"] + s["socket_errors"] + s["timeouts"] + s["lost"]
        vers = ", ".join(f"{k}: {n}" for k, n in sorted(s["versions"].items()))
        lines.append(
            f"| {s['index'] * s['seconds'] / 60:.2f} | {s['answered']} | {s['rps']:.0f} | "
            f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['p999_ms']:.1f} | {s['max_ms']:.0f} | "
            f"{failed} | {vers} |"
        )
    lines += [
        "",
        "| process | pid | RSS after warm-up (MiB) | max | end | max drift | USS after warm-up "
        "| USS max drift |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in result["memory"]:
        if "rss" not in m:
            lines.append(f"| {m['role']} | {m['pid']} | {m.get('note', '')} | | | | | |")
            continue
        r, u = m["rss"], m["uss"]
        role = f"**{m['role']}**" if m["serve"] else m["role"]
        lines.append(
            f"| {role} | {m['pid']} | {r['after_warmup_mib']} | {r['max_mib']} | "
            f"{r['end_mib']} | {r['max_drift_pct']}% | {u['after_warmup_mib']} | "
            f"{u['max_drift_pct']}% |"
        )
    lines += ["", f"![soak]({png})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1-minute smoke run")
    parser.add_argument("--minutes", type=float, default=None, help="soak length (10)")
    parser.add_argument("--load", type=float, default=0.7, help="share of capacity (0.7)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (60)")
    parser.add_argument(
        "--baseline-seconds", type=float, default=None, help="window of the level after warm-up"
    )
    parser.add_argument("--segment", type=float, default=None, help="seconds a wrk process (60)")
    parser.add_argument(
        "--promote-at", type=float, default=0.5, help="promote at this share of the soak"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=256,
        help="wrk connections (256: enough that slots go out on time while the endpoint "
        "queues, up to 120 ms of latency at 2,100 req/s)",
    )
    parser.add_argument("--timeout", type=int, default=10, help="client timeout (s)")
    parser.add_argument("--capacity-concurrency", default="32,64")
    parser.add_argument("--capacity-seconds", type=float, default=None, help="each (10)")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--memory-tolerance", type=float, default=10.0, help="percent")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "minutes": 1.0 if quick else 10.0,
        "warmup": 20.0 if quick else 60.0,
        "baseline_seconds": 10.0 if quick else 30.0,
        "segment": 10.0 if quick else 60.0,
        "capacity_seconds": 5.0 if quick else 10.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.capacity_concurrency = [int(c) for c in args.capacity_concurrency.split(",")]
    if not shutil.which("wrk"):
        parser.error("wrk is not on PATH (apt-get install wrk): the soak's load needs it")
    if not 0 < args.load <= 1:
        parser.error(f"--load: expected a share in (0, 1], got {args.load}")
    return args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    began = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {msg}", flush=True)

    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    machine = benchlib.machine()
    _uri, bodies = register_versions(SCRATCH, log)

    from cluster.local import free_ports

    port = free_ports(1)[0]
    _CLUSTER.append(SCRATCH)
    _, up_s = rayship(["up", "--workers", "0"])
    _, serve_s = rayship(["serve", f"{NAME}@production", "--port", str(port)])
    info = json.loads((SCRATCH / ".rayship" / "cluster.json").read_text())
    sessions = {int(s) for s in info.get("session_ids", [])}
    url = f"http://127.0.0.1:{port}/v1/models/{NAME}:predict"
    log(f"endpoint up ({info.get('ingress')}; up {up_s:.0f} s, serve {serve_s:.0f} s): {url}")

    sampler = MemorySampler(sessions, cfg.sample_every)
    sampler.sample()
    sampler.start()
    try:
        cap = capacity(url, bodies[0], cfg.capacity_concurrency, cfg.capacity_seconds, log)
        rate = round(cfg.load * cap["rps"], 1)
        time.sleep(3)  # let the queues drain
        seconds = cfg.minutes * 60
        # wrk counts a timeout for a connection that has sent nothing for --timeout s:
        # every connection must get a slot within the first second.
        connections = min(cfg.connections, max(1, int(rate)))
        n = max(1, round(seconds / cfg.segment))
        seg_s = seconds / n
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(_lua(bodies))
            script = Path(f.name)
        soak_start = time.monotonic() + LEAD_S + 0.5
        promoter = Promoter(soak_start + cfg.promote_at * seconds, "2")
        promoter.start()
        log(
            f"soak: {rate} req/s ({cfg.load:.0%} of {cap['rps']} req/s) for {cfg.minutes} min "
            f"in {n} segments, {connections} connections; promote at "
            f"{cfg.promote_at * seconds:.0f} s"
        )
        segments = [Segment(i, soak_start + i * seg_s, seg_s, rate) for i in range(n)]
        results: list[dict] = []
        for i, seg in enumerate(segments):
            time.sleep(max(0.0, seg.start - LEAD_S - time.monotonic()))
            launch(seg, url, script, connections, cfg.timeout)
            if i >= 1:  # the previous one has stopped sending by the time this one starts
                results.append(_report(collect(segments[i - 1]), soak_start, log))
        results.append(_report(collect(segments[-1]), soak_start, log))
        promoter.join(timeout=300)
        time.sleep(cfg.sample_every)
    finally:
        sampler.finish()
        with contextlib.suppress(Exception):
            script.unlink()

    for sample in sampler.samples:
        sample["t"] = round(sample["t"] - soak_start, 2)
    totals = {
        k: sum(s[k] for s in results)
        for k in (
            "sent",
            "unsent",
            "answered",
            "non_2xx",
            "socket_errors",
            "timeouts",
            "lost",
            "late_slots",
        )  # fmt: skip
    }
    totals["late_max_ms"] = max(s["late_max_ms"] for s in results)
    totals["versions"] = {}
    for s in results:
        for v, c in s["versions"].items():
            totals["versions"][v] = totals["versions"].get(v, 0) + c
    during = [x for x in sampler.samples[1:] if 0 < x["t"] <= seconds + DRAIN_S]
    cpu = {
        key: round(statistics.fmean(x[f"cpu_{key}"] for x in during), 3) if during else None
        for key in ("busy", "cluster", "load_generator", "other")
    }
    memory = memory_report(
        sampler, cfg.warmup, cfg.baseline_seconds, cfg.baseline_seconds, cfg.memory_tolerance
    )
    promote = promote_check(results, promoter.result, "1", "2")
    serve_mem = [m for m in memory if m["serve"]]
    roles = {m["role"] for m in serve_mem}
    replaced = [  # a Serve process that started or ended during the soak (HAProxy: reloads)
        m
        for m in serve_mem
        if m["first_seen_s"] > 0 or (not m["alive_at_end"] and m["last_seen_s"] >= 0)
    ]
    load_held = totals["unsent"] == 0
    verdict = {
        "errors_zero": totals["non_2xx"] + totals["socket_errors"] + totals["timeouts"] == 0
        and totals["lost"] == 0,
        "memory_within_tolerance": bool(serve_mem)
        and all(m.get("within_tolerance", False) for m in serve_mem)
        and not replaced,
        "promote_lost_nothing": promote["ok"],
        # every slot of the schedule was sent (late ones too): the constant load was offered
        "load_held": load_held,
        "haproxy_processes": next((m["pids"] for m in serve_mem if m["role"] == HAPROXY), []),
        "replicas_seen": sum(m["role"] == "replica" for m in serve_mem),
        "serve_roles_seen": sorted(roles),
        "processes_started_or_ended_during_soak": [
            {
                "pid": m["pid"],
                "role": m["role"],
                "first_s": m["first_seen_s"],
                "last_s": m["last_seen_s"],
            }
            for m in replaced
        ],  # fmt: skip
    }
    verdict["pass"] = all(
        verdict[k]
        for k in ("errors_zero", "memory_within_tolerance", "promote_lost_nothing", "load_held")
    )
    for s in results:  # times relative to the soak's start
        s["start_s"] = round(s["start_s"] - soak_start, 3)
        s["first_seen"] = {k: round(t - soak_start, 3) for k, t in s["first_seen"].items()}
        s["last_seen"] = {k: round(t - soak_start, 3) for k, t in s["last_seen"].items()}
    for key in ("started_s", "first_new_answer_s", "last_old_answer_s"):
        if promote.get(key) is not None:
            promote[key] = round(promote[key] - soak_start, 3)
    result = {
        "benchmark": "soak",
        "quick": cfg.quick,
        "command": "benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine, "wrk": load.wrk_version(), "loadavg_at_end": os.getloadavg()},
        "config": {
            "minutes": cfg.minutes,
            "load": cfg.load,
            "warmup_s": cfg.warmup,
            "baseline_s": cfg.baseline_seconds,
            "segment_s": seg_s,
            "connections": connections,
            "client_timeout_s": cfg.timeout,
            "sample_every_s": cfg.sample_every,
            "memory_tolerance_pct": cfg.memory_tolerance,
            "promote_at": cfg.promote_at,
            "late_threshold_ms": LATE_S * 1000,
            "bodies": f"{BODIES} one-row V1 bodies of churn holdout rows, sent in turn",
        },
        "endpoint": {
            "model": NAME,
            "versions": {"1": "LogisticRegression C=1.0", "2": "LogisticRegression C=0.1"},
            "replicas": REPLICAS,
            "ingress": info.get("ingress"),
            "url": url,
            "rayship_up_s": round(up_s, 1),
            "rayship_serve_s": round(serve_s, 1),
        },
        "capacity": cap,
        "target_rps": rate,
        "soak_start_s": 0.0,  # every time in this file is seconds since the soak started
        "soak_start_monotonic_s": soak_start,  # ...but the segments' ticks (monotonic s)
        "totals": totals,
        "cpu_during_soak": cpu,  # mean shares of the machine's cores (MemorySampler)
        "promote": promote,
        "verdict": verdict,
        "memory": memory,
        "segments": results,
        "samples": sampler.samples,
        "wall_s": round(time.monotonic() - began, 1),
    }
    _print_verdict(result)
    stem = "soak-quick" if cfg.quick else "soak"
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    try:
        plot(result, out_dir / f"{stem}.png")
    except Exception as exc:  # the JSON is what counts
        log(f"no plot: {type(exc).__name__}: {exc}")
    (out_dir / f"{stem}.md").write_text(markdown(result, f"{stem}.png"))
    log(f"wrote {out_dir}/{stem}.json, .md, .png")
    return 0 if verdict["pass"] else 1


def _report(seg: dict, t0: float, log) -> dict:
    failed = seg["non_2xx"] + seg["socket_errors"] + seg["timeouts"] + seg["lost"]
    log(
        f"  {seg['start_s'] - t0:6.0f} s: {seg['answered']}/{seg['sent']} answered "
        f"({seg['rps']:.0f} req/s), p50 {seg['p50_ms']:.1f} p99 {seg['p99_ms']:.1f} "
        f"max {seg['max_ms']:.0f} ms, failed {failed}, late {seg['late_slots']} "
        f"(latest {seg['late_max_ms']:.0f} ms), unsent {seg['unsent']}, "
        f"versions {seg['versions']}"
    )
    return seg


def _print_verdict(result: dict[str, Any]) -> None:
    v, t, p = result["verdict"], result["totals"], result["promote"]
    print("\nmemory (RSS MiB: after warm-up -> max, end; max drift):")
    for m in result["memory"]:
        if "rss" in m:
            r = m["rss"]
            flag = "" if not m["serve"] else ("  ok" if m["within_tolerance"] else "  OVER")
            print(
                f"  {m['role']:<24} {m['pid']:>8}  {r['after_warmup_mib']:8.1f} -> "
                f"{r['max_mib']:8.1f}, {r['end_mib']:8.1f}  {r['max_drift_pct']:6.2f}%{flag}"
            )
    print(
        f"requests: {t['sent']} sent ({t['unsent']} not), {t['answered']} answered, "
        f"non-2xx {t['non_2xx']}, "
        f"socket errors {t['socket_errors']}, timeouts {t['timeouts']}, lost {t['lost']}; "
        f"versions {t['versions']}"
    )
    c = result["cpu_during_soak"]
    print(
        f"CPU during the soak (shares of the cores): busy {c['busy']}, cluster "
        f"{c['cluster']}, wrk + this script {c['load_generator']}, other work {c['other']}"
    )
    print(
        f"promote: command {p['command_s']} s, ok {p['command_ok']}, both versions for "
        f"{p['both_versions_for_s']} s, failed {p['failed_requests_in_promote_segments']}, "
        f"old answers after the command: {p['old_answers_after_command']}"
    )
    print(
        f"VERDICT: errors zero {v['errors_zero']}; memory within tolerance "
        f"{v['memory_within_tolerance']}; promote lost nothing {v['promote_lost_nothing']}; "
        f"load held {v['load_held']} -> {'PASS' if v['pass'] else 'FAIL'}"
    )


if __name__ == "__main__":
    sys.exit(main())
