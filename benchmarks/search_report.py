"""benchmarks/RESULTS.md and the search plots, from the JSON of tuning.py and overhead.py.

    .venv/bin/python benchmarks/search_report.py [--results DIR]

``DIR`` (default benchmarks/results) holds ``tuning.json``, ``overhead.json`` and
``scaling.json`` of one ``make bench`` run; the plots go beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


def machine_lines(m: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return [
        f"- Machine: {m['cores']} cores ({m['cpu'] or 'CPU model unknown'}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; "
        f"load average at start {m['load_average_at_start']}.",
        f"- Versions: {versions}.",
    ]


def tuning_section(t: dict[str, Any], plot: str) -> list[str]:
    lines = [
        f"## Time to a target score ({t['mode']} mode, {t['repeats']} run(s) a tool, medians)",
        "",
        *machine_lines(t["machine"]),
        "",
    ]
    for c in t["cases"]:
        case = c["case"]
        lines += [
            f"### {case['name']}: {case['budget']} configurations, target holdout "
            f"{c['metric']} {case['target']}",
            "",
            "| tool | time to target (s) | time to common score (s) | best at "
            f"{case['wall_budget_s']} s | final holdout | wall (s) | CPU use |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for tool, s in c["summary"].items():
            lines.append(
                f"| {tool} | {_fmt(s['time_to_target_s'])} | {_fmt(s['time_to_common_s'])} | "
                f"{_fmt(s['best_at_budget'])} | {_fmt(s['final_holdout'])} | "
                f"{_fmt(s['wall_s'])} | {_fmt(s['cpu_utilisation'])} |"
            )
        target = c["issue_target"]
        met = {True: "met", False: "**not met**", None: "no ratio (a tool missed)"}[target["met"]]
        ratio = c["ratios"].get("rayship", {}).get("time_to_target_s", {})
        lines += [
            "",
            f"Issue target: {target['what']}: ratio {_fmt(target['ratio'])} "
            f"(best peer: {ratio.get('best_peer') or '—'}) — {met}.",
            "",
        ]
    lines += [f"![best-so-far holdout score against time]({plot})", ""]
    return lines


def overhead_section(o: dict[str, Any], plot: str) -> list[str]:
    lines = ["## Overhead of a search", "", *machine_lines(o["machine"]), ""]
    lines += [
        "| one-second trials | reuse_actors | wall (s) | minimum (s) | overhead | "
        "per trial (s) | trial processes | fit() to first trial (s) | "
        "between trials on an actor (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in o["bookkeeping"]:
        lines.append(
            f"| {b['trials']} | {b['reuse_actors']} | {b['wall_s']} | {b['minimum_s']} | "
            f"{b['overhead_pct']} % | {b['per_trial_overhead_s']} | {b['trial_processes']} | "
            f"{_fmt(b.get('start_to_first_trial_s'))} | {_fmt(b.get('between_trials_s'))} |"
        )
    lines += [
        "",
        "| trial of | cold: start to first report (s) | warm (s) | search wall per trial (s) |",
        "| --- | --- | --- | --- |",
    ]
    for name, f in o["fixed_cost"].items():
        lines.append(f"| {name} | {f['cold_s']} | {f['warm_s']} | {f['search_wall_per_trial_s']} |")
    if "ddp" in o:
        d = o["ddp"]
        lines += [
            "",
            f"TorchTrainer against plain DDP, {d['job']}: plain `torch.multiprocessing.spawn` "
            f"{d['native_ddp_s']} s, 2-worker `TorchTrainer` {d['torch_trainer_s']} s, "
            f"ratio {d['ratio']}.",
        ]
    lines += ["", "Issue targets:", ""]
    limits = {
        "bookkeeping_overhead_pct <= 10": 10,
        "warm torch 1-worker first report < 1 s": 1,
        "warm 2-worker TorchTrainer first report < 5 s": 5,
        "TorchTrainer / plain DDP on a job of >= 60 s <= 1.05": 1.05,
    }
    for what, value in o["targets"].items():
        ok = value is not None and value <= limits.get(what, float("inf"))
        lines.append(f"- {what}: {value} — {'met' if ok else '**not met**'}")
    lines += ["", f"![overhead]({plot})", ""]
    return lines


def scaling_section(sc: dict[str, Any], plot: str) -> list[str]:
    lines = [
        "## Scaling across local nodes",
        "",
        *machine_lines(sc["machine"]),
        f"- Each node: {sc['cpus_per_node']} logical CPUs (a raylet of "
        "`ray.cluster_utils.Cluster` on this one machine); trials sleep "
        f"{sc['trial_s']} s (this machine adds no cores with its nodes: what is measured is "
        f"what Ray and Tune add), {sc['trials_per_slot']} trials a slot.",
        "",
        "| nodes | slots | trials | wall (s) | trials/min | ideal | efficiency | "
        "fit() to first trial (s) | steady efficiency | trials per node | "
        "driver CPU s a trial |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in sc["sizes"]:
        lines.append(
            f"| {s['nodes']} | {s['slots']} | {s['trials']} | {s['wall_s']} | "
            f"{s['trials_per_min']} | {s['ideal_trials_per_min']} | {s['efficiency']} | "
            f"{s['start_to_first_trial_s']} | {s['steady_efficiency']} | "
            f"{s['trials_per_node']} | {s['driver_cpu_s_per_trial']} |"
        )
    p = sc["on_paper"]
    lines += [
        "",
        f"On paper, {p['nodes']} nodes: {p['trials_per_min']} trials a minute, limited by "
        f"{p['limited_by']} (nodes allow {p['node_bound_trials_per_min']}, one Tune driver "
        f"{p['driver_bound_trials_per_min']}); assumes {p['assumes']}.",
        "",
        f"![scaling]({plot})",
        "",
    ]
    return lines


def plot_scaling(sc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [s["nodes"] for s in sc["sizes"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(nodes, [s["trials_per_min"] for s in sc["sizes"]], "o-", label="measured")
    ax.plot(nodes, [s["ideal_trials_per_min"] for s in sc["sizes"]], "k:", label="ideal")
    ax.set_xticks(nodes)
    ax.set_xlabel("Ray nodes")
    ax.set_ylabel(f"{sc['trial_s']:g}-second trials per minute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_tuning(t: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = t["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, c in zip(axes[0], cases, strict=True):
        for tool, runs in c["runs"].items():
            points = runs[0]["trajectory"]
            if points:
                xs = [p["t"] for p in points] + [runs[0]["wall_s"]]
                ys = [p["holdout"] for p in points] + [points[-1]["holdout"]]
                ax.step(xs, ys, where="post", label=tool)
        ax.axhline(c["case"]["target"], color="grey", linestyle=":", label="target")
        ax.set_title(c["case"]["name"])
        ax.set_xlabel("seconds from process start")
        ax.set_ylabel(f"holdout {c['metric']} of best-so-far")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_overhead(o: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(o["fixed_cost"])
    cold = [o["fixed_cost"][n]["cold_s"] for n in names]
    warm = [o["fixed_cost"][n]["warm_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], cold, width=0.4, label="cold (new actor)")
    ax.bar([x + 0.2 for x in xs], warm, width=0.4, label="warm (reused actor)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("trial start to first report (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    args.results, args.out = args.results.resolve(), args.out.resolve()
    where = args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results
    lines = [
        "# Search benchmarks",
        "",
        "Written by `benchmarks/search_report.py` from one `make bench` run "
        f"(`{where}`). How each tool is set up: `benchmarks/tuning.py` and "
        "`benchmarks/tuning_tools.py`; "
        "what is measured: `benchmarks/overhead.py` and `benchmarks/scaling.py`.",
        "",
    ]
    rel = args.out.parent
    tuning, overhead = args.results / "tuning.json", args.results / "overhead.json"
    if tuning.exists():
        t = json.loads(tuning.read_text())
        plot_tuning(t, args.results / "tuning.png")
        lines += tuning_section(t, str((args.results / "tuning.png").relative_to(rel)))
    if overhead.exists():
        o = json.loads(overhead.read_text())
        plot_overhead(o, args.results / "overhead.png")
        lines += overhead_section(o, str((args.results / "overhead.png").relative_to(rel)))
    scaling = args.results / "scaling.json"
    if scaling.exists():
        sc = json.loads(scaling.read_text())
        plot_scaling(sc, args.results / "scaling.png")
        lines += scaling_section(sc, str((args.results / "scaling.png").relative_to(rel)))
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
