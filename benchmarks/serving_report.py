"""Tables, ratios and the plot of benchmarks/serving.py's results (JSON in, markdown/PNG out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PEERS = ("mlflow", "bentoml", "fastapi")
REFERENCE = "uvicorn-onnx"  # rayship's request code under bare uvicorn: not a peer
PROXY = "rayship-proxy"  # rayship on Serve's Python proxy: the path before the native ingress
ORDER = ("rayship", PROXY, *PEERS, REFERENCE, "ceiling")
# Issue 8, on the same 2 cores in the same run: rayship's throughput at equal or lower p99
# at least the best peer's in every model x rows; at least half a bare uvicorn app's
# running the same ONNX graph; the MLP's 1-row p50 at concurrency 1 at most 2 ms.
TARGET_VS_PEER = 1.0
TARGET_VS_UVICORN = 0.5
TARGET_MLP_P50_MS = 2.0


def _cell(cells, server, model, rows, c=None):
    for x in cells:
        if (x["server"], x["model"], x["rows"]) == (server, model, rows) and (
            c is None or x["concurrency"] == c
        ):
            return x
    return None


def _peak(cells, server, model, rows):
    """The server's highest-throughput cell without errors (None if it has none)."""
    ok = [
        x
        for x in cells
        if (x["server"], x["model"], x["rows"]) == (server, model, rows)
        and x["requests"]
        and not x["errors"]
    ]
    return max(ok, key=lambda x: x["rps"]) if ok else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def compare(cells: list[dict]) -> dict[str, Any]:
    """rayship against the best peer, its reference, the ceiling and its old path.

    ``at_equal_or_lower_p99`` (issue 8's first target): the best peer's highest-throughput
    cell sets a p99 bound; rayship's best throughput among its cells whose p99 is within
    that bound, as a ratio (0 when none is). ``ratios``: peak throughput (the best cell
    without errors over the concurrencies) of rayship over uvicorn-onnx, the ceiling and
    rayship-proxy, and the p50s at concurrency 1. ``targets``: every issue-8 target
    with its value and whether it is met (None: not measured in this run).
    """
    per_cell, at_p99, ratios = [], [], []
    keys = sorted({(x["model"], x["rows"]) for x in cells if x["server"] == "rayship"})
    for model, rows in keys:
        ray = [x for x in cells if (x["server"], x["model"], x["rows"]) == ("rayship", model, rows)]
        peers = [
            x
            for x in cells
            if x["server"] in PEERS and (x["model"], x["rows"]) == (model, rows) and x["requests"]
        ]
        for r in sorted(ray, key=lambda x: x["concurrency"]):
            c = r["concurrency"]
            same = [p for p in peers if p["concurrency"] == c]
            best = max(same, key=lambda p: p["rps"]) if same else None
            ref = _cell(cells, REFERENCE, model, rows, c)
            old = _cell(cells, PROXY, model, rows, c)
            per_cell.append(
                {
                    "model": model,
                    "rows": rows,
                    "concurrency": c,
                    "rayship_rps": r["rps"],
                    "rayship_p99_ms": r["p99_ms"],
                    "rayship_errors": r["errors"],
                    "best_peer": best["server"] if best else None,
                    "best_peer_rps": best["rps"] if best else None,
                    "best_peer_p99_ms": best["p99_ms"] if best else None,
                    "ratio": _ratio(r["rps"], best["rps"] if best else None),
                    "uvicorn_onnx_rps": ref["rps"] if ref else None,
                    "ratio_uvicorn_onnx": _ratio(r["rps"], ref["rps"] if ref else None),
                    "proxy_rps": old["rps"] if old else None,
                    "ratio_proxy": _ratio(r["rps"], old["rps"] if old else None),
                }
            )
        if peers and ray:
            top = max(peers, key=lambda p: p["rps"])
            within = [r for r in ray if r["p99_ms"] <= top["p99_ms"] and not r["errors"]]
            best_ray = max(within, key=lambda r: r["rps"]) if within else None
            ratio = best_ray["rps"] / top["rps"] if best_ray else 0.0
            at_p99.append(
                {
                    "model": model,
                    "rows": rows,
                    "best_peer": top["server"],
                    "best_peer_concurrency": top["concurrency"],
                    "best_peer_rps": top["rps"],
                    "best_peer_p99_ms": top["p99_ms"],
                    "rayship_concurrency": best_ray["concurrency"] if best_ray else None,
                    "rayship_rps": best_ray["rps"] if best_ray else None,
                    "rayship_p99_ms": best_ray["p99_ms"] if best_ray else None,
                    "ratio": ratio,
                    "target": TARGET_VS_PEER,
                    "meets_target": ratio >= TARGET_VS_PEER,
                }
            )
        peak = _peak(cells, "rayship", model, rows)
        ref, old = _peak(cells, REFERENCE, model, rows), _peak(cells, PROXY, model, rows)
        ceil = _cell(cells, "ceiling", model, rows)
        c1, old_c1 = _cell(cells, "rayship", model, rows, 1), _cell(cells, PROXY, model, rows, 1)
        rps = peak["rps"] if peak else None
        ratios.append(
            {
                "model": model,
                "rows": rows,
                "rayship_peak_rps": rps,
                "rayship_peak_concurrency": peak["concurrency"] if peak else None,
                "uvicorn_onnx_peak_rps": ref["rps"] if ref else None,
                "uvicorn_onnx_peak_concurrency": ref["concurrency"] if ref else None,
                "vs_uvicorn_onnx": _ratio(rps, ref["rps"] if ref else None),
                "ceiling_rps": ceil["rps"] if ceil else None,
                "vs_ceiling": _ratio(rps, ceil["rps"] if ceil else None),
                "proxy_peak_rps": old["rps"] if old else None,
                "vs_proxy": _ratio(rps, old["rps"] if old else None),
                "rayship_p50_c1_ms": c1["p50_ms"] if c1 else None,
                "proxy_p50_c1_ms": old_c1["p50_ms"] if old_c1 else None,
            }
        )
    return {
        "per_concurrency": per_cell,
        "at_equal_or_lower_p99": at_p99,
        "ratios": ratios,
        "targets": _targets(at_p99, ratios, cells),
    }


def _targets(at_p99: list[dict], ratios: list[dict], cells: list[dict]) -> list[dict]:
    out = []
    for c in at_p99:
        out.append(
            {
                "target": "throughput at equal or lower p99 ÷ best peer's",
                "model": c["model"],
                "rows": c["rows"],
                "value": c["ratio"],
                "goal": f"≥ {TARGET_VS_PEER:g}",
                "met": c["meets_target"],
            }
        )
    for r in ratios:
        value = r["vs_uvicorn_onnx"]
        out.append(
            {
                "target": f"peak throughput ÷ {REFERENCE}'s",
                "model": r["model"],
                "rows": r["rows"],
                "value": value,
                "goal": f"≥ {TARGET_VS_UVICORN:g}",
                "met": None if value is None else value >= TARGET_VS_UVICORN,
            }
        )
    c1 = _cell(cells, "rayship", "mlp", 1, 1)
    p50 = c1["p50_ms"] if c1 and c1["requests"] and not c1["errors"] else None
    out.append(
        {
            "target": "p50 ms at concurrency 1",
            "model": "mlp",
            "rows": 1,
            "value": p50,
            "goal": f"≤ {TARGET_MLP_P50_MS:g} ms",
            "met": None if p50 is None else p50 <= TARGET_MLP_P50_MS,
        }
    )
    return out


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _met(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


# ------------------------------------------------------------------------- time split


def _split_rows(split: dict[str, Any], rows: list[int]) -> list[str]:
    def get(key: str):
        return lambda n: (split.get(f"{key}_{n}") or {}).get("p50_ms")

    def step(name: str):
        return lambda n: (split.get(f"replica_steps_{n}") or {}).get(name)

    def diff(a, b):
        def fn(n):
            x, y = a(n), b(n)
            return None if x is None or y is None else x - y

        return fn

    spec = [
        ("in-process: `parse_v1` (JSON body → instances)", step("parse_v1")),
        ("in-process: `check_options` + `OnnxPredictor.feeds`", step("feeds")),
        ("in-process: `run_many` (onnxruntime)", step("run_many")),
        ("in-process: `respond` + JSON encode (`services.http.dumps`)", step("respond")),
        ("**in-process: replica code total**", step("total")),
        ("HTTP, bare uvicorn (1 process): trivial endpoint", get("uvicorn_trivial")),
        ("HTTP, bare uvicorn (1 process): rayship's request code", get("uvicorn_code")),
        ("HTTP, no-op Serve deployment, straight to its replica's port", get("serve_noop_direct")),
        ("HTTP, no-op Serve deployment, through HAProxy", get("serve_noop_haproxy")),
        (
            "HTTP, no-op + `@serve.batch(64, 0)`, straight to its replica",
            get("serve_batched_direct"),
        ),
        ("HTTP, no-op + `@serve.batch(64, 0)`, through HAProxy", get("serve_batched_haproxy")),
        ("HTTP, rayship, straight to a replica's port", get("rayship_direct")),
        ("**HTTP, rayship through HAProxy (the endpoint)**", get("rayship_haproxy")),
        (
            "HTTP, rayship `GET /v1/models/{name}` through HAProxy (no body, no batch)",
            lambda n: (split.get("rayship_metadata") or {}).get("p50_ms"),
        ),
    ]
    derived = [
        (
            "HAProxy's hop, rayship (through HAProxy − straight to the replica)",
            diff(get("rayship_haproxy"), get("rayship_direct")),
        ),
        (
            "HAProxy's hop, no-op (through HAProxy − straight to the replica)",
            diff(get("serve_noop_haproxy"), get("serve_noop_direct")),
        ),
        (
            "a Serve replica's HTTP server and request path (no-op direct − trivial uvicorn)",
            diff(get("serve_noop_direct"), get("uvicorn_trivial")),
        ),
        (
            "`@serve.batch` at one request in flight (batched − no-op, direct)",
            diff(get("serve_batched_direct"), get("serve_noop_direct")),
        ),
        (
            "rayship's handler beyond a batched no-op, in the replica (rayship − batched, direct)",
            diff(get("rayship_direct"), get("serve_batched_direct")),
        ),
        (
            "… of it not rayship's request code (that − in-process total): batch wait, "
            "metrics, routing",
            diff(diff(get("rayship_direct"), get("serve_batched_direct")), step("total")),
        ),
        (
            "all of Ray Serve (rayship through HAProxy − the same code under uvicorn)",
            diff(get("rayship_haproxy"), get("uvicorn_code")),
        ),
    ]
    lines = []
    for label, fn in spec:
        lines.append(f"| {label} | " + " | ".join(_f(fn(n), 3) for n in rows) + " |")
    for label, fn in derived:
        lines.append(f"| ≈ {label} | " + " | ".join(_f(fn(n), 3) for n in rows) + " |")
    return lines


def _cpu_label(run: dict[str, Any]) -> str:
    if run["target"] == "idle":
        return "idle, ms/s"
    what = {"rayship": "rayship", "serve-noop": "no-op Serve", "uvicorn": "uvicorn code"}
    rows = f"{run['rows']} row{'s' if run['rows'] != 1 else ''}"
    return f"{what.get(run['target'], run['target'])}, {rows}, c={run['concurrency']}"


def _cpu_table(runs: list[dict[str, Any]]) -> list[str]:
    """Process classes down, runs across: CPU ms a request (idle: ms a second)."""
    if not runs:
        return []

    def per(run: dict[str, Any], ms: float) -> float:
        if run["target"] == "idle":
            return ms / run["wall_s"]  # ms of CPU a second of wall time
        return ms / run["requests"] if run["requests"] else float("nan")

    totals: dict[str, float] = {}
    for run in runs:
        for name, ms in run["cpu_ms"].items():
            totals[name] = totals.get(name, 0.0) + ms
    classes = sorted(totals, key=lambda k: -totals[k])
    out = [
        "| process class | " + " | ".join(_cpu_label(r) for r in runs) + " |",
        "| --- | " + " | ".join("---:" for _ in runs) + " |",
        "| req/s | "
        + " | ".join("–" if r["target"] == "idle" else _f(r["rps"]) for r in runs)
        + " |",
        "| p50 ms (wrk) | "
        + " | ".join("–" if r["target"] == "idle" else _f(r["p50_ms"], 2) for r in runs)
        + " |",
    ]
    for name in classes:
        out.append(
            f"| {name} | "
            + " | ".join(
                _f(per(r, r["cpu_ms"][name]), 3) if name in r["cpu_ms"] else "–" for r in runs
            )
            + " |"
        )
    out.append(
        "| **all processes** | "
        + " | ".join(_f(per(r, sum(r["cpu_ms"].values())), 3) for r in runs)
        + " |"
    )
    out.append(
        "| **machine-wide busy (/proc/stat)** | "
        + " | ".join(_f(per(r, r["machine_busy_ms"]), 3) for r in runs)
        + " |"
    )
    out.append(
        "| haproxy processes that used CPU (a reload starts a new one) | "
        + " | ".join(str(r.get("processes", {}).get("haproxy", "–")) for r in runs)
        + " |"
    )
    out.append(
        "| cores busy (machine-wide) | "
        + " | ".join(_f(r["machine_busy_ms"] / 1000 / r["wall_s"], 2) for r in runs)
        + " |"
    )
    return out


# ---------------------------------------------------------------------------- markdown


def markdown(result: dict[str, Any], png: str) -> str:
    m = result["machine"]
    cfg = result["config"]
    cells = result["cells"]
    rows = cfg["rows"]
    comp = result["comparison"]
    out = [
        "# Serving benchmark" + (" (quick run)" if result.get("quick") else ""),
        "",
        "`make bench-serving` (or `.venv/bin/python benchmarks/serving.py [--quick]`); "
        "what is measured and how: the docstring of `benchmarks/serving.py`.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory']}, Python {m['python']}. "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f". Load generator: {m['load_generator']}"
        + (f" ({m['wrk']}, one thread)" if m.get("wrk") else "")
        + f", closed loop, {cfg['warmup_s']:g} s warm-up then {cfg['duration_s']:g} s per cell, "
        f"one server at a time, all servers in this one run. Whole run: {result['wall_s']:.0f} s.",
        "",
        "Models (`sklearn:digits`, 64 features, 10 classes; holdout of "
        f"{next(iter(result['models'].values()))['holdout_rows']} rows):",
        "",
    ]
    for key, info in result["models"].items():
        out.append(
            f"- `{key}` ({info['name']}): {info['family']}; holdout accuracy "
            f"{info['holdout_accuracy']}; ONNX parity max diff {info['onnx_parity_max_diff']:.1e}; "
            f"native vs ONNX label mismatches {info['native_vs_onnx_label_mismatches']}"
        )
    out += [
        "",
        "Every server answered the offline model's labels for the 1-row and 64-row "
        "payloads before it was measured (a server that did not is listed below).",
        "",
        f"![throughput against p99]({png})",
        "",
        "## Targets (issue 8)",
        "",
        "Peers: " + ", ".join(PEERS) + f". `{REFERENCE}` (rayship's request code under "
        "bare uvicorn) and the ceiling are references, not peers. Peak throughput: a "
        "server's best cell without errors over the concurrencies.",
        "",
        "| target | model | rows | value | goal | status |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for t in comp.get("targets", []):
        digits = 2
        out.append(
            f"| {t['target']} | {t['model']} | {t['rows']} | {_f(t['value'], digits)} | "
            f"{t['goal']} | {_met(t['met'])} |"
        )
    out += [
        "",
        "Without a target (for the record):",
        "",
        "| model | rows | rayship peak req/s (c) | ÷ uvicorn-onnx peak | ÷ ceiling "
        "| ÷ rayship-proxy peak | p50 c=1 ms: rayship | rayship-proxy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in comp.get("ratios", []):
        out.append(
            f"| {r['model']} | {r['rows']} | {_f(r['rayship_peak_rps'])} "
            f"({r['rayship_peak_concurrency'] or '–'}) | {_f(r['vs_uvicorn_onnx'], 2)} | "
            f"{_f(r['vs_ceiling'], 3)} | {_f(r['vs_proxy'], 2)} | "
            f"{_f(r['rayship_p50_c1_ms'], 2)} | {_f(r['proxy_p50_c1_ms'], 2)} |"
        )
    out += [
        "",
        "## Results",
        "",
        "The machine is shared (other work may run beside the benchmark): `load` is the "
        "1-minute load average when the cell started (2 cores; above 2 means something "
        "else was competing for them).",
        "",
        "| model | rows | concurrency | server | req/s | rows/s | p50 ms | p99 ms | errors "
        "| load |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rank = {name: i for i, name in enumerate(ORDER)}
    keyed = sorted(
        cells,
        key=lambda x: (x["model"], x["rows"], x["concurrency"], rank.get(x["server"], 99)),
    )
    for x in keyed:
        conc = "in-process" if x["server"] == "ceiling" else x["concurrency"]
        out.append(
            f"| {x['model']} | {x['rows']} | {conc} | {x['server']} | {_f(x['rps'])} | "
            f"{_f(x['rows_per_s'], 0)} | {_f(x['p50_ms'], 2)} | {_f(x['p99_ms'], 2)} | "
            f"{x['errors']} | {_f(x.get('loadavg_1m'), 2)} |"
        )
    failures = [
        f"- {server} / {model}: {info['error']}"
        for server, per_model in result["servers"].items()
        for model, info in per_model.items()
        if info.get("error")
    ]
    if failures:
        out += ["", "Servers that failed:", "", *failures]
    out += [
        "",
        "## rayship against the best peer, its reference and its old path",
        "",
        "Per concurrency: rayship req/s ÷ the best peer's at the same concurrency, ÷ "
        f"`{REFERENCE}`'s, ÷ `{PROXY}`'s.",
        "",
        "| model | rows | c | rayship req/s | p99 ms | best peer | req/s | p99 ms | ratio "
        f"| {REFERENCE} req/s | ratio | {PROXY} req/s | ratio |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: " + "| ---: " * 4 + "|",
    ]
    for c in comp["per_concurrency"]:
        out.append(
            f"| {c['model']} | {c['rows']} | {c['concurrency']} | {_f(c['rayship_rps'])} | "
            f"{_f(c['rayship_p99_ms'], 2)} | {c['best_peer'] or '–'} | "
            f"{_f(c['best_peer_rps'])} | {_f(c['best_peer_p99_ms'], 2)} | {_f(c['ratio'], 2)} | "
            f"{_f(c.get('uvicorn_onnx_rps'))} | {_f(c.get('ratio_uvicorn_onnx'), 2)} | "
            f"{_f(c.get('proxy_rps'))} | {_f(c.get('ratio_proxy'), 2)} |"
        )
    out += [
        "",
        "At equal or lower p99 (issue 8's first target): the best peer's highest-throughput "
        "cell sets the p99 bound; rayship's best throughput among its cells within that "
        f"bound. Target: ratio ≥ {TARGET_VS_PEER:g} in every model × rows.",
        "",
        "| model | rows | best peer (c) | req/s | p99 ms | rayship (c) | req/s | p99 ms "
        "| ratio | target |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for c in comp["at_equal_or_lower_p99"]:
        out.append(
            f"| {c['model']} | {c['rows']} | {c['best_peer']} ({c['best_peer_concurrency']}) | "
            f"{_f(c['best_peer_rps'])} | {_f(c['best_peer_p99_ms'], 2)} | "
            f"rayship ({c['rayship_concurrency'] or '–'}) | {_f(c['rayship_rps'])} | "
            f"{_f(c['rayship_p99_ms'], 2)} | {_f(c['ratio'], 2)} | {_met(c['meets_target'])} |"
        )
    out += _time_split(result, rows)
    out += ["## Server configurations", ""]
    for name, note in result["server_notes"].items():
        out.append(f"- **{name}**: {note}")
    out += [
        "- All peers and uvicorn-onnx: `OMP_NUM_THREADS=1` (and MKL/OpenBLAS), so a worker "
        "per core does not also start a thread per core in scikit-learn's OpenMP or torch "
        "(the oversubscription that scikit-learn's and PyTorch's CPU performance notes "
        "warn of).",
        "",
    ]
    return "\n".join(out)


def _time_split(result: dict[str, Any], rows: list[int]) -> list[str]:
    cells = result["cells"]
    out = [
        "",
        "## Where a rayship request's time goes (native ingress)",
        "",
        "**Wall time**, median ms. In-process rows: rayship's replica code "
        "(`parse_v1`, `services.predictor.OnnxPredictor`) timed step by step in the "
        "benchmark process. HTTP rows: round trips one at a time on one keep-alive "
        "connection from a Python client (its own cost, about the same in every row, is "
        "inside each number) to rayship's endpoint through HAProxy and straight to one of "
        "its replicas' own HTTP server (the port Serve's controller gives HAProxy), to "
        "no-op Serve applications deployed beside rayship's on its cluster "
        "(`benchmarks/peers/serve_probe.py`: `num_cpus=0`, access log off like rayship's "
        "replicas), and to rayship's request code under one uvicorn process "
        "(`benchmarks/peers/uvicorn_onnx.py`). Differences (≈) attribute the time.",
        "",
        "**CPU time**: CPU ms a request by process class during a closed-loop `wrk` run "
        f"of {result['config'].get('cpu_seconds', '?')} s (after a 1 s warm-up), from "
        "utime+stime in `/proc/<pid>/stat` sampled every 0.25 s (a process that exits "
        "during the run keeps what it was last seen using, so an HAProxy reload loses at "
        "most that much), classified by the latest command line (Ray renames its "
        "workers); Ray classes only for processes in the cluster's sessions. "
        "`machine-wide busy` is all CPUs' busy time from `/proc/stat` (kernel network "
        "work included, and whatever else ran on the machine), so it is at least the sum "
        "of the processes. The idle column is CPU ms a second with no requests: the "
        "cluster's background, which is inside every per-request figure at its rate.",
        "",
    ]
    for key, split in result["time_split"].items():
        out += [
            f"### {key}",
            "",
            "| step | " + " | ".join(f"{n} row{'s' if n > 1 else ''} ms" for n in rows) + " |",
            "| --- | " + " | ".join("---:" for _ in rows) + " |",
        ]
        ceil = [_cell(cells, "ceiling", key, n) for n in rows]
        out.append(
            "| onnxruntime `run` alone (ceiling p50) | "
            + " | ".join(_f(c["p50_ms"] if c else None, 3) for c in ceil)
            + " |"
        )
        out += _split_rows(split, rows)
        errs = [f"{k}: {v}" for k, v in split.items() if "error" in k] + [
            f"{k}: {v['errors']} of {v['n']} requests answered non-2xx ({v.get('first_error')})"
            for k, v in split.items()
            if isinstance(v, dict) and v.get("errors")
        ]
        if errs:
            out += ["", *[f"- {e}" for e in errs]]
        cpu = split.get("cpu") or []
        if cpu:
            out += ["", f"CPU ms a request ({key}):", "", *_cpu_table(cpu)]
            bad = [r for r in cpu if r.get("errors")]
            if bad:
                out += [""] + [
                    f"- {_cpu_label(r)}: {r['errors']} of {r['requests']} requests failed"
                    for r in bad
                ]
        out.append("")
    return out


# -------------------------------------------------------------------------------- plot

STYLE = {
    "rayship": ("tab:red", "o-"),
    PROXY: ("tab:pink", "s--"),
    "mlflow": ("tab:blue", "o-"),
    "bentoml": ("tab:green", "o-"),
    "fastapi": ("tab:orange", "o-"),
    REFERENCE: ("tab:purple", "^:"),
}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    cells = result["cells"]
    models = list(result["models"])
    rows = result["config"]["rows"]
    fig, axes = plt.subplots(
        len(models), len(rows), figsize=(6 * len(rows), 4.5 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, n in enumerate(rows):
            ax = axes[i][j]
            for server, (color, fmt) in STYLE.items():
                pts = sorted(
                    (
                        x
                        for x in cells
                        if (x["server"], x["model"], x["rows"]) == (server, model, n)
                        and x["requests"]
                    ),
                    key=lambda x: x["concurrency"],
                )
                if not pts:
                    continue
                ax.plot(
                    [p["p99_ms"] for p in pts],
                    [p["rps"] for p in pts],
                    fmt,
                    color=color,
                    label=server,
                )
                for p in pts:
                    ax.annotate(
                        f"c={p['concurrency']}",
                        (p["p99_ms"], p["rps"]),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=color,
                    )
            ceil = _cell(cells, "ceiling", model, n)
            if ceil:
                ax.axhline(ceil["rps"], color="gray", ls="--", lw=1)
                ax.text(
                    0.02,
                    0.97,
                    f"ceiling (onnxruntime in-process): {ceil['rps']:,.0f} req/s",
                    transform=ax.transAxes,
                    fontsize=7,
                    color="gray",
                    va="top",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_minor_formatter(NullFormatter())
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("p99 latency (ms)")
            ax.set_ylabel("requests/s")
            ax.set_title(f"{model}, {n} row{'s' if n > 1 else ''} per request")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Serving on {result['machine']['cores']} cores, one run: throughput against p99 "
        "(closed loop; points are concurrency levels; up and left is better)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
