"""benchmarks/RESULTS.md and the search plots, from the JSON of tuning.py and overhead.py.

    .venv/bin/python benchmarks/search_report.py [--results DIR]

``DIR`` (default benchmarks/results) holds ``tuning.json`` and ``overhead.json`` of one
``make bench`` run; the plots go beside them (``tuning.png``, ``overhead.png``).
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
        "per trial (s) | trial processes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in o["bookkeeping"]:
        lines.append(
            f"| {b['trials']} | {b['reuse_actors']} | {b['wall_s']} | {b['minimum_s']} | "
            f"{b['overhead_pct']} % | {b['per_trial_overhead_s']} | {b['trial_processes']} |"
        )
    lines += [
        "",
        "| trial of | cold: start to first report (s) | warm (s) | search wall per trial (s) |",
        "| --- | --- | --- | --- |",
    ]
    for name, f in o["fixed_cost"].items():
        lines.append(f"| {name} | {f['cold_s']} | {f['warm_s']} | {f['search_wall_per_trial_s']} |")
    lines += ["", "Issue targets:", ""]
    limits = {
        "bookkeeping_overhead_pct <= 10": 10,
        "warm torch 1-worker first report < 1 s": 1,
        "warm 2-worker TorchTrainer first report < 5 s": 5,
    }
    for what, value in o["targets"].items():
        ok = value is not None and value <= limits.get(what, float("inf"))
        lines.append(f"- {what}: {value} — {'met' if ok else '**not met**'}")
    lines += ["", f"![overhead]({plot})", ""]
    return lines


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
        "what is measured: `benchmarks/overhead.py`.",
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
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
