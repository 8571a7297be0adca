"""What the drift monitor costs the endpoint: throughput with it on and off, side by side.

One Ray cluster in this process (2 CPUs, Serve's native ingress as ``rayship up`` sets
it), one endpoint serving the churn model (5 features, two of them categorical) with
its drift reference, one replica. The monitor is switched between **on**
(``sample_rate`` 1.0: every request sampled, its rows turned into slot codes and pushed
to the merger actor) and **off** (``sample_rate`` 0 in the endpoint's ``user_config``:
the replica keeps one method call per request that returns at once) by changing only
``user_config``, so Serve reconfigures the same replica and nothing else changes
between the two. Each (body, mode) cell is a closed-loop run (``wrk`` through
``benchmarks/serving_load.closed_loop``) after a short warm-up; the modes alternate,
on/off/on/off..., for ``--rounds`` rounds, and the cost is read from the medians.

    flock /tmp/rayship-cpu.lock .venv/bin/python benchmarks/monitor_cost.py \
        [--duration 8] [--rounds 3] [--concurrency 8] [--out benchmarks/results/monitor_cost.json]

Bodies: 1 row (the per-request cost) and 64 rows (the per-row cost: codes of 64 rows
per request). The merger's row count is read after each "on" run to show that the
monitor did see the traffic.

Throughput on a 2-core machine shared with the load generator moves by several percent
between runs, so each run also accounts CPU time (``serving_load.cpu_split``, from
``/proc``): the replica's CPU ms per request with the monitor on and off is the cost
itself, and the merger actor's CPU (its own pid) is added to the "on" side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import benchlib  # noqa: E402
from benchmarks import serving_load as load  # noqa: E402

NAME = "churn-cost"


def register_model(folder: Path) -> str:
    """Fit the churn model, register it with its drift reference; the tracking URI."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    benchlib.register_churn(folder, uri, NAME, benchmark="monitor_cost")
    return uri


def start_ray(folder: Path, ports: list[int]) -> None:
    """Ray on this machine with the native ingress environment ``rayship up`` gives
    (HAProxy's four ports from ``ports``)."""
    import ray

    from cluster.local import claim_replica_ports
    from services import ingress

    os.environ.update(
        ingress.serve_env(
            files_dir=str(folder),
            stats_port=ports[0],
            metrics_port=ports[1],
            replica_ports=claim_replica_ports(str(folder)),
            fallback_ports=(ports[2], ports[3]),
        )
    )
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
             log_to_driver=False)  # fmt: skip


def deploy(uri: str, port: int, sample_rate: float) -> str:
    from services.deploy import deploy as deploy_config
    from services.serve_config import ServedModel, serve_config
    from training.spec import ServeSpec

    spec = ServeSpec(min_replicas=1, max_replicas=1, cpus_per_replica=1, max_batch_size=64)
    model = ServedModel(name=NAME, ref="production", serve=spec, sample_rate=sample_rate)
    return deploy_config(serve_config([model], tracking_uri=uri, port=port))


def merger_stats() -> dict[str, Any]:
    """The merger's stats (rows seen, pid), or zeros before it exists."""
    import ray

    from services.monitor import NAMESPACE, merger_name

    try:
        actor = ray.get_actor(merger_name(NAME), namespace=NAMESPACE)
    except ValueError:
        return {"seen": 0, "pid": None}
    return ray.get(actor.stats.remote())


def cpu_ms(pid: int | None) -> float:
    """CPU time (user + system) of one process so far, in ms."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def cluster_sessions() -> set[int]:
    """Session ids of this Ray cluster's processes (HAProxy included), for cpu_split (the
    replica is told apart by its command line; only its CPU is read)."""
    sids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "haproxy" in cmd:
                sids.add(os.getsid(int(pid)))
        except OSError:
            continue
    return sids


def body_of(rows: int) -> bytes:
    from services.http import dumps

    frame = benchlib.make_churn(rows, 99).drop(columns=["churn"])
    instances = [
        {k: (None if (isinstance(v, float) and np.isnan(v)) else v) for k, v in r.items()}
        for r in frame.to_dict(orient="records")
    ]
    return dumps({"instances": instances})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rows", default="1,64")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/monitor_cost.json")
    cfg = parser.parse_args(argv)

    import ray
    from ray import serve

    from cluster.local import free_ports

    folder = Path(tempfile.mkdtemp(prefix="mc-", dir="/tmp"))  # short: HAProxy's sockets
    started = time.monotonic()
    uri = register_model(folder)
    *haproxy, port = free_ports(5)
    start_ray(folder, haproxy)
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for rows in [int(r) for r in cfg.rows.split(",")]:
            body = body_of(rows)
            per_mode = cells.setdefault(str(rows), {"on": [], "off": []})
            for _ in range(cfg.rounds):
                for mode, rate in (("on", 1.0), ("off", 0.0)):
                    url = deploy(uri, port, rate)
                    target = f"{url}/v1/models/{NAME}:predict"
                    load.closed_loop(target, body, cfg.concurrency, cfg.warmup)
                    time.sleep(1.0)  # the warm-up's last flush
                    before = merger_stats()
                    merger0 = cpu_ms(before["pid"])
                    result = load.cpu_split(
                        lambda t=target, b=body: load.closed_loop(
                            t, b, cfg.concurrency, cfg.duration
                        ),
                        cluster_sessions(),
                    )
                    requests = max(1, result["requests"])
                    replica = result["cpu_ms"].get("replicas (rayship)", 0.0)
                    result["replica_cpu_ms_per_request"] = replica / requests
                    result["merger_cpu_ms_per_request"] = 0.0
                    if mode == "on":
                        time.sleep(1.0)  # the last flush
                        after = merger_stats()
                        result["monitor_rows"] = after["seen"] - before["seen"]
                        result["merger_cpu_ms_per_request"] = (
                            cpu_ms(after["pid"]) - merger0
                        ) / requests
                    per_mode[mode].append(result)
                    print(
                        f"{rows:>3} rows  monitor {mode:3}  {result['rps']:8.1f} req/s  "
                        f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                        f"replica {result['replica_cpu_ms_per_request']:.4f} CPU ms/req  "
                        f"merger {result['merger_cpu_ms_per_request']:.4f}  "
                        f"errors {result['errors']}",
                        flush=True,
                    )
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)

    summary = {}
    for rows, per_mode in cells.items():
        on = statistics.median(r["rps"] for r in per_mode["on"])
        off = statistics.median(r["rps"] for r in per_mode["off"])
        cpu_on = statistics.median(
            r["replica_cpu_ms_per_request"] + r["merger_cpu_ms_per_request"] for r in per_mode["on"]
        )
        cpu_off = statistics.median(r["replica_cpu_ms_per_request"] for r in per_mode["off"])
        summary[rows] = {
            "rps_on": round(on, 1),
            "rps_off": round(off, 1),
            "cost_pct": round(100.0 * (off - on) / off, 2),
            "cpu_ms_per_request_on": round(cpu_on, 4),
            "cpu_ms_per_request_off": round(cpu_off, 4),
            "cpu_cost_pct": round(100.0 * (cpu_on - cpu_off) / cpu_off, 2),
            "p50_ms_on": statistics.median(r["p50_ms"] for r in per_mode["on"]),
            "p50_ms_off": statistics.median(r["p50_ms"] for r in per_mode["off"]),
            "monitor_rows_per_request": round(
                sum(r["monitor_rows"] for r in per_mode["on"])
                / max(1, sum(r["requests"] for r in per_mode["on"])),
                2,
            ),
        }
    out = {
        "what": "throughput of one replica with the drift monitor on (sample_rate 1.0) "
        "and off (sample_rate 0), same replica reconfigured between runs, alternating",
        "command": "benchmarks/monitor_cost.py " + " ".join(argv or sys.argv[1:]),
        "loadgen": load.loadgen_name(),
        "concurrency": cfg.concurrency,
        "duration_s": cfg.duration,
        "rounds": cfg.rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "ray": ray.__version__,
        "target_cost_pct": 5.0,
        "summary": summary,
        "runs": cells,
        "wall_s": round(time.monotonic() - started, 1),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(out, indent=2) + "\n")
    for rows, s in summary.items():
        print(
            f"{rows:>3} rows: on {s['rps_on']} req/s, off {s['rps_off']} req/s, "
            f"throughput cost {s['cost_pct']}%; replica+merger CPU a request "
            f"{s['cpu_ms_per_request_on']} vs {s['cpu_ms_per_request_off']} ms, "
            f"{s['cpu_cost_pct']}%"
        )
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
