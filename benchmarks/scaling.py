"""Trials per minute as local Ray worker nodes are added (1, 2, 3 nodes), and what 100
nodes would do, on paper, from those figures.

Each node is a real raylet (``ray.cluster_utils.Cluster``: a head and N-1 worker nodes,
``--cpus-per-node`` logical CPUs each) on this one machine. The trials are Tune trials with
rayship's settings (``reuse_actors``, one CPU each, ``max_concurrent_trials`` = the
cluster's CPUs, a checkpoint with each report, rayship's MLflow callback and the JSON/CSV
loggers) that each *sleep* ``--trial-s`` seconds and report once. Sleeping, not training,
is the point: this machine has 2 cores, so adding local nodes adds no compute, and a
CPU-bound trial would measure the cores, not Ray. What is left to measure is what Ray and
Tune add as the cluster grows — placing trials on other nodes, moving their checkpoints
and results back, the driver's bookkeeping — which is what limits a real cluster whose
nodes do bring their own cores.

Per cluster size: wall time, trials per minute against the ideal (slots x 60 / trial
length), the nodes the trials ran on, and the CPU seconds the driver (the Tune
controller, this process) spent per trial. On paper, 100 nodes give
``min(100 x per-node rate x steady efficiency, 60 / driver CPU s per trial)`` trials a
minute: the first term assumes the steady-state efficiency measured at the largest size
here (trials run between the first trial's start and the last one's end, against what
the slots allow; the search's start-up is reported apart) holds, the second is the one
Tune driver's ceiling (it processes every result and checkpoint itself). A warm-up search
runs first, so the driver's one-time imports count in no size.

    .venv/bin/python benchmarks/scaling.py [--quick] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import benchlib, overhead  # noqa: E402


def search(n_trials: int, length_s: float, state: Path) -> dict[str, Any]:
    """One search of ``n_trials`` sleeping trials on the connected cluster."""
    import ray

    slots = int(ray.cluster_resources()["CPU"])
    run = overhead.sleep_search(n_trials, length_s, slots, True, state, "scaling")
    grid, wall, epoch0, driver_cpu = run.grid, run.wall_s, run.started, run.driver_cpu_s
    per_node: dict[str, int] = {}
    for r in grid:
        per_node[r.metrics["node"]] = per_node.get(r.metrics["node"], 0) + 1
    ideal = slots * 60 / length_s
    rate = n_trials * 60 / wall
    first = min(r.metrics["started"] for r in grid)
    last = max(r.metrics["ended"] for r in grid)
    steady = n_trials * length_s / (slots * (last - first))
    return {
        "slots": slots,
        "trials": n_trials,
        "wall_s": round(wall, 2),
        "minimum_s": round(n_trials * length_s / slots, 2),
        "trials_per_min": round(rate, 1),
        "ideal_trials_per_min": round(ideal, 1),
        "efficiency": round(rate / ideal, 3),
        "start_to_first_trial_s": round(first - epoch0, 2),
        "steady_efficiency": round(steady, 3),
        "trials_per_node": sorted(per_node.values(), reverse=True),
        "driver_cpu_s_per_trial": round(driver_cpu / n_trials, 4),
    }


def run_size(nodes: int, cpus_per_node: int, n_trials: int, length_s: float) -> dict[str, Any]:
    """Start a cluster of ``nodes`` raylets, run one search on it, tear it down."""
    import ray
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    started = time.monotonic() - t0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = search(n_trials, length_s, Path(tmp))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"nodes": nodes, "cluster_start_s": round(started, 2), **result}


def on_paper(sizes: list[dict[str, Any]], nodes: int = 100) -> dict[str, Any]:
    """What ``nodes`` nodes would do, from the largest measured size (see the docstring)."""
    last = sizes[-1]
    per_node_ideal = last["ideal_trials_per_min"] / last["nodes"]
    node_bound = nodes * per_node_ideal * last["steady_efficiency"]
    driver_cpu = max(s["driver_cpu_s_per_trial"] for s in sizes)
    driver_bound = 60 / driver_cpu if driver_cpu > 0 else float("inf")
    return {
        "nodes": nodes,
        "assumes": f"steady efficiency {last['steady_efficiency']} (measured at {last['nodes']} "
        "nodes; the search's start-up amortised over a long search) holds; "
        f"the driver spends at most {driver_cpu} CPU s a trial (the largest measured)",
        "node_bound_trials_per_min": round(node_bound),
        "driver_bound_trials_per_min": round(driver_bound),
        "trials_per_min": round(min(node_bound, driver_bound)),
        "limited_by": "nodes" if node_bound <= driver_bound else "the Tune driver",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 trials a slot, not 8")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--trial-s", type=float, default=2.0, help="length of one trial")
    args = parser.parse_args()
    out = benchlib.out_dir(args.out_dir, args.quick)
    per_slot = 4 if args.quick else 8
    report: dict[str, Any] = {
        "benchmark": "scaling",
        "machine": benchlib.machine(),
        "cpus_per_node": args.cpus_per_node,
        "trial_s": args.trial_s,
        "trials_per_slot": per_slot,
        "sizes": [],
    }
    run_size(1, args.cpus_per_node, args.cpus_per_node, args.trial_s)  # warm-up: imports
    for nodes in (1, 2, 3):
        n = per_slot * nodes * args.cpus_per_node
        report["sizes"].append(run_size(nodes, args.cpus_per_node, n, args.trial_s))
        benchlib.log(json.dumps(report["sizes"][-1]))
    report["on_paper"] = on_paper(report["sizes"])
    benchlib.write_json(out / "scaling.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
