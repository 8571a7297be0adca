"""The ``rayship`` command line: Typer commands, rich output.

Help is Click's plain layout (``rich_markup_mode=None``), like ``kubectl``'s: one line a
command, the detail in ``rayship COMMAND --help``. Every command exits non-zero with one
clear line on a known failure (a refused spec, bad data, a failed export, an unknown
model, a cluster problem). State lives under ``./.rayship`` of the working directory.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

HELP = """rayship searches hyperparameters on Ray, gates and registers the winner in MLflow as an
ONNX model, and serves it with Ray Serve: on this machine, a Ray cluster or Kubernetes.

Find more information in README.md and docs/."""
EPILOG = """\b
Examples:
  rayship run examples/digits.yaml          # search, gate, register, promote, serve
  rayship models list digits                # versions, metrics, aliases
  rayship serve digits --canary 4           # 10% of requests to version 4
  rayship predict digits --input rows.csv   # a CSV's rows to the endpoint
  rayship drift digits --data new.csv       # new rows against the training data
  rayship retrain examples/digits.yaml --data new.csv --if-drifted   # the loop's last step
  rayship render examples/digits.yaml --out k8s/   # RayJob + RayService manifests

Use "rayship COMMAND --help" for more information about a command."""

app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None, help=HELP, epilog=EPILOG
)
models_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="List, promote and roll back versions."
)
app.add_typer(models_app, name="models")
console = Console()
STATE = Path(".rayship")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(1)


def _known_errors() -> tuple[type[BaseException], ...]:
    from cluster.k8s import K8sError
    from cluster.local import ClusterError
    from cluster.retrain import RetrainError
    from services.deploy import DeployError, PredictError
    from training.data import DataError
    from training.export import ExportError
    from training.registry import RegistryError
    from training.spec import SpecError
    from training.tracking import TrackingError
    from training.tune import SearchError

    return (
        K8sError,
        SpecError,
        DataError,
        ExportError,
        RegistryError,
        ClusterError,
        SearchError,
        DeployError,
        PredictError,
        RetrainError,
        TrackingError,
        FileNotFoundError,
        ValueError,
    )


def _guard(fn):
    """Turn the errors a user can act on into one red line and exit code 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _known_errors() as exc:
            _fail(str(exc))

    return wrapper


def _load_spec(path: Path):
    from training.spec import load_spec

    return load_spec(path)


def _tracking_uri() -> str:
    from training.registry import tracking_uri

    return tracking_uri(STATE)


def _quiet() -> None:
    """Keep the terminal to rayship's own lines: the rich progress bar stands in for
    Tune's status table, and Ray/MLflow INFO logs and worker output stay in the Ray
    session's log files (trial errors still reach the summary)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("ray", "ray.tune", "ray.train", "ray.serve", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Optuna warns that list choices (hidden_layers) cannot go to its persistent storage;
    # rayship keeps Optuna's study in memory.
    warnings.filterwarnings("ignore", message="Choices for a categorical distribution")


@app.callback()
def _main() -> None:
    _quiet()


def _connect(persistent: bool) -> None:
    """Connect to the recorded cluster; without one, start a head node that outlives this
    command (``persistent``, so an endpoint keeps answering) or an in-process Ray."""
    from cluster import local

    if persistent and local.status(STATE) is None:
        console.print("[dim]no rayship cluster running: starting one (rayship down stops it)[/]")
        local.up(workers=0, state_dir=STATE)
    console.print(f"[dim]Ray: {local.connect(STATE, log_to_driver=False)}[/]")


def _search(spec, num_samples: int | None, resume: bool, persistent: bool, splits=None):
    from cluster.progress import SearchProgress
    from training.pipeline import search_and_register
    from training.tracking import check_reachable

    # An MLflow server that does not answer fails here, before Ray or the search starts.
    check_reachable(_tracking_uri())
    if spec.search.algorithm == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created…"
    from training.tune import planned_trials

    # A resumed search has trials done already: count what finishes now, without a total.
    total = None if resume else planned_trials(spec, num_samples)
    with SearchProgress(console, spec.metric, spec.mode, total) as progress:
        return search_and_register(
            spec,
            state_dir=STATE,
            num_samples=num_samples,
            resume=resume,
            callbacks=[progress],
            connect=lambda: _connect(persistent),
            splits=splits,
        )


def _print_outcome(outcome) -> None:
    s = outcome.search
    console.print(
        f"search: {s.trials} trials ({s.errored} errored) on {len(s.trial_nodes)} node(s) "
        f"in {s.wall_s:.1f} s; "
        f"winner {outcome.family} "
        f"(trial {s.trial_id}), valid {outcome.metric} {s.best_metrics[outcome.metric]:.4f}"
    )
    console.print(
        f"holdout {outcome.metric}: [bold]{outcome.holdout:.4f}[/]; ONNX parity max diff "
        f"{outcome.parity.max_abs_diff:.2e} on {outcome.parity.rows} rows"
    )
    if outcome.passed:
        console.print(
            f"[green]gate passed[/]: registered {outcome.name} "
            f"version {outcome.version} as candidate"
        )
    else:
        reasons = "; ".join(outcome.reasons)
        console.print(f"[yellow]gate refused[/]: {reasons} (no version registered)")


@app.command()
@_guard
def tune(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="experiment spec (YAML)")],
    num_samples: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="override search.num_samples")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the newest interrupted search of this spec")
    ] = False,
) -> None:
    """Search and train; register a winner that passes the gate.

    The winner becomes version N of the model with the `candidate` alias.

    Exits 2 when no trial passes the gate (nothing is registered then)."""
    spec = _load_spec(spec_path)
    outcome = _search(spec, num_samples, resume, persistent=False)
    _print_outcome(outcome)
    if not outcome.passed:
        raise typer.Exit(2)


@app.command()
@_guard
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="experiment spec (YAML)")],
    port: Annotated[
        int, typer.Option(min=1, max=65535, metavar="PORT", help="HTTP port of the endpoint")
    ] = 8000,
    num_samples: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="override search.num_samples")
    ] = None,
) -> None:
    """Search, gate, register, promote and serve: the main job.

    The winner is promoted to `production` if it beats the current one on the same
    holdout; the endpoint then serves production and answers one sample request, whose
    `curl` line is printed. The cluster it starts outlives the command (`rayship down`)."""
    from services.deploy import predict_http, serve_model
    from training import registry

    spec = _load_spec(spec_path)
    outcome = _search(spec, num_samples, resume=False, persistent=True)
    _print_outcome(outcome)
    uri = _tracking_uri()
    if outcome.passed and _beats_production(outcome):
        registry.set_alias(uri, spec.name, registry.PRODUCTION, outcome.version)
        console.print(f"promoted {spec.name} version {outcome.version} to production")
    elif outcome.production_version is None:
        _fail(
            f"no version of {spec.name} passed the gate and none is in production; nothing to serve"
        )
    else:
        console.print(f"serving the current production version {outcome.production_version}")
    url = serve_model(
        spec.name, registry.PRODUCTION, tracking_uri=uri, serve_spec=spec.serve, port=port
    )
    sample = _sample_request(outcome)
    reply = predict_http(url, spec.route, sample["instances"])
    console.print(f"sample prediction: {json.dumps(reply)}")
    sample_path = STATE / f"{spec.name}-sample.json"
    sample_path.write_text(json.dumps(sample))
    console.print(f"endpoint: [bold]{url}/v1/models/{spec.route}:predict[/]")
    console.print(
        f"curl -s -X POST {url}/v1/models/{spec.route}:predict "
        f"-H 'Content-Type: application/json' -d @{sample_path}",
        soft_wrap=True,
    )


class RetrainMode(StrEnum):
    append = "append"
    replace = "replace"


@app.command()
@_guard
def retrain(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="experiment spec (YAML)")],
    data: Annotated[
        Path,
        typer.Option(
            "--data", exists=True, dir_okay=False, metavar="FILE", help="new rows (CSV/Parquet)"
        ),
    ],
    mode: Annotated[
        RetrainMode, typer.Option(help="add the rows to the spec's data, or use them alone")
    ] = RetrainMode.append,
    if_drifted: Annotated[
        bool, typer.Option("--if-drifted", help="only if the live endpoint reports drift")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="retrain even within monitor.cooldown_s")
    ] = False,
    kubernetes: Annotated[
        bool, typer.Option("--kubernetes", help="swap the model's RayService (kube context)")
    ] = False,
    namespace: Annotated[
        str, typer.Option(metavar="NS", help="namespace of the RayService")
    ] = "rayship",
    url: Annotated[
        str | None, typer.Option(metavar="URL", help="endpoint to ask for drift (default: found)")
    ] = None,
    num_samples: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="override search.num_samples")
    ] = None,
) -> None:
    """Retrain on new data; promote and hot-swap a winner.

    Searches on the new data (appended to the spec's, or replacing it). The candidate is
    gated against production scored on the same holdout, drawn from the new rows (the
    gate's rules and gate.min_improvement). A winner becomes `production` and the live
    endpoint switches to it in place (local, or the RayService with --kubernetes). A
    loser changes nothing, and the reasons are printed. --if-drifted asks the
    endpoint's drift report first.

    No retrain within monitor.cooldown_s of the last one (--force). Exits 0 when it
    promoted, refused a worse model, found no drift or is in its cooldown; 1 on errors."""
    from cluster import retrain as loop

    spec = _load_spec(spec_path)

    def search(searched_spec, splits):
        outcome = _search(searched_spec, num_samples, False, False, splits=splits)
        _print_outcome(outcome)
        return outcome

    where = loop.Where(STATE, kubernetes=kubernetes, namespace=namespace, url=url)
    say = lambda line: console.print(line, soft_wrap=True, highlight=False)  # noqa: E731
    loop.retrain(
        spec, data, mode=mode.value, where=where, search=search, say=say,
        if_drifted=if_drifted, force=force,
    )  # fmt: skip


def _beats_production(outcome) -> bool:
    """Promote the first version, or one better than production on the same holdout
    (the gate may pass a model without comparing: must_beat_production false)."""
    from training.evaluate import better

    if outcome.production_version is None:
        return True
    if outcome.production_holdout is None:
        return False  # not comparable (other features or classes): promote by hand
    return better(outcome.metric, outcome.holdout, outcome.production_holdout)


def _sample_request(outcome) -> dict:
    """The first holdout row as a V1 request body, keyed by the data's own column names
    (the holdout frame is keyed by ONNX input names)."""
    from services.deploy import as_instances

    X = outcome.splits.X_test
    row = {  # float32 scalars, which print short
        f.column: X[f.name].to_numpy()[0] for f in outcome.splits.schema.features
    }
    return {"instances": as_instances([row])}


@models_app.command("list")
@_guard
def models_list(
    name: Annotated[str | None, typer.Argument(help="one model; default: all")] = None,
) -> None:
    """List versions with their holdout metric and aliases."""
    from training.registry import list_versions

    rows = list_versions(_tracking_uri(), name)
    table = Table("model", "version", "aliases", "family", "metric", "holdout")
    for r in rows:
        table.add_row(
            r["name"], r["version"], ", ".join(r["aliases"]), r["family"], r["metric"], r["holdout"]
        )
    console.print(table if rows else "no registered models")


@models_app.command("promote")
@_guard
def models_promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Argument(min=1, help="version number to move `production` to")],
    kubernetes: Annotated[
        bool, typer.Option(help="also switch the model's RayService (current kube context)")
    ] = False,
    namespace: Annotated[
        str, typer.Option(metavar="NS", help="namespace of the RayService")
    ] = "rayship",
) -> None:
    """Move the `production` alias to VERSION.

    A local endpoint serving NAME switches to it in place (no restart, no failed
    request), and a canary of NAME ends. With --kubernetes, the RayService's
    serveConfigV2 is patched the same way."""
    from training import registry

    uri = _tracking_uri()
    registry.load_artifact(uri, name, str(version))  # exists and passes its checksum
    registry.set_alias(uri, name, registry.PRODUCTION, str(version))
    console.print(f"{name}: production → version {version}")
    if kubernetes:
        from cluster import k8s
        from cluster.k8s_apply import promote_rayservice

        service = k8s.resource_name(name, "serve")
        promote_rayservice(name, str(version), namespace=namespace, service=service)
        console.print(
            f"RayService {namespace}/{service}: serveConfigV2 now serves version {version}"
        )
        return
    _update_live(name, ref=str(version), canary=None)


@models_app.command("abort-canary")
@_guard
def models_abort_canary(
    name: Annotated[str, typer.Argument(help="registered model name")],
) -> None:
    """End NAME's canary: all traffic back to production."""
    if not _update_live(name, canary=None):
        _fail(f"no local endpoint serves {name}")


def _update_live(name: str, **parts: object) -> bool:
    """Change NAME's entry on the running local endpoint in place (user_config only;
    cluster.live.update_live: ``ref=``, ``canary=``, only the parts given change) and
    print what it serves. Returns False when no local endpoint serves NAME."""
    from cluster import live

    swapped = live.update_live(STATE, name, **parts)
    for s in swapped or []:
        extra = f", canary version {s.canary_version}" if s.canary_version else ""
        console.print(f"live at {s.url}/v1/models/{s.route}: version {s.version}{extra}")
    return swapped is not None


def _parse_ref(text: str) -> tuple[str, str]:
    """NAME, NAME@alias or NAME/version → (name, ref)."""
    if "@" in text:
        name, ref = text.split("@", 1)
    elif "/" in text:
        name, ref = text.split("/", 1)
        if not ref.isdigit():
            raise ValueError(f"{text!r}: a version after '/' must be a number")
    else:
        name, ref = text, "production"
    if not name or not ref:
        raise ValueError(f"{text!r}: expected NAME, NAME@alias or NAME/version")
    return name, ref


@app.command()
@_guard
def serve(
    models: Annotated[
        list[str],
        typer.Argument(metavar="MODEL", help="NAME (production), NAME@alias or NAME/version"),
    ],
    port: Annotated[
        int, typer.Option(min=1, max=65535, metavar="PORT", help="HTTP port of the endpoint")
    ] = 8000,
    host: Annotated[
        str, typer.Option(metavar="HOST", help="HTTP address of the endpoint")
    ] = "127.0.0.1",
    canary: Annotated[
        int | None,
        typer.Option(min=1, metavar="VERSION", help="version to send a share of the traffic to"),
    ] = None,
    canary_weight: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, metavar="SHARE", help="share of requests the canary gets"),
    ] = 0.1,
    write_config: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="write the Serve config (for `serve deploy FILE`); deploy nothing"
        ),
    ] = None,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log", help="log every request in the replicas' logs (spec: serve.access_log)"
        ),
    ] = False,
) -> None:
    """Serve registered models on one endpoint of the local cluster.

    Each model gets its own /v1 and /v2 routes and the serve section (route, replicas,
    batching) of the spec its version was searched with. The models listed replace what
    the endpoint served before. A cluster is started if none runs."""
    from services.deploy import deploy
    from services.serve_config import ServedModel, dump, serve_config
    from training import registry
    from training.spec import ServeSpec

    refs = [_parse_ref(m) for m in models]
    if canary is not None and len(refs) != 1:
        _fail("--canary: give exactly one model to put a canary on")
    uri = _tracking_uri()
    served = []
    for name, ref in refs:
        spec = (
            _serve_section(registry.load_artifact(uri, name, ref)) or ServeSpec()
        )  # fails before Ray
        if access_log:
            spec = spec.model_copy(update={"access_log": True})
        served.append(
            ServedModel(
                name=name,
                ref=ref,
                serve=spec,
                canary_ref=None if canary is None else str(canary),
                canary_weight=0.0 if canary is None else canary_weight,
            )
        )
    if canary is not None:
        registry.load_artifact(uri, refs[0][0], str(canary))
    config = serve_config(served, tracking_uri=uri, host=host, port=port)
    if write_config is not None:
        write_config.write_text(dump(config))
        console.print(f"wrote {write_config}: serve deploy {write_config} runs this endpoint")
        return
    _connect(persistent=True)
    url = deploy(config)
    for model in served:
        extra = f" (canary version {canary} at {canary_weight:.0%})" if model.canary_ref else ""
        console.print(
            f"serving {model.name}@{model.ref}{extra} at "
            f"[bold]{url}/v1/models/{model.client_route}:predict[/] and "
            f"{url}/v2/models/{model.client_route}/infer"
        )


def _serve_section(artifact):
    """The serve section of the spec stored with a version (None if it has none)."""
    import yaml

    from training.spec import parse_spec

    if not artifact.spec_yaml:
        return None
    return parse_spec(yaml.safe_load(artifact.spec_yaml)).serve


@app.command()
@_guard
def predict(
    name: Annotated[str, typer.Argument(help="model name (its route)")],
    input: Annotated[
        Path,
        typer.Option(
            "--input", exists=True, dir_okay=False, metavar="CSV", help="CSV of feature rows"
        ),
    ],
    url: Annotated[
        str, typer.Option(metavar="URL", help="endpoint base URL")
    ] = "http://127.0.0.1:8000",
    output: Annotated[
        Path | None, typer.Option(metavar="CSV", help="write a CSV with a prediction column")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, metavar="ROWS", help="rows per request")] = 256,
) -> None:
    """Send a CSV's rows to the endpoint; print the predictions.

    With --output, the CSV is written back with a `prediction` column.

    The header names the model's features by the data's own column names (or their
    ONNX names)."""
    import pandas as pd

    from services.deploy import predict_http

    frame = pd.read_csv(input)
    rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    predictions = []
    for start in range(0, len(rows), batch):
        predictions += predict_http(url, name, rows[start : start + batch])["predictions"]
    if output:
        frame.assign(prediction=predictions).to_csv(output, index=False)
        console.print(f"wrote {len(predictions)} predictions to {output}")
    else:
        for p in predictions:
            print(p)


def _read_table(path: Path):
    """A CSV or Parquet file as a frame; ValueError naming --data when it cannot be read."""
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"--data: no such file {path}")
    reader = pd.read_parquet if path.suffix.lower() == ".parquet" else pd.read_csv
    try:
        return reader(path)
    except Exception as exc:  # pandas/pyarrow raise many kinds for an unreadable file
        kind = "Parquet" if reader is pd.read_parquet else "CSV"
        raise ValueError(f"--data: cannot read {path} as {kind}: {exc}") from None


@app.command()
@_guard
def drift(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="NAME (production), NAME@alias or NAME/version")
    ],
    data: Annotated[
        Path,
        typer.Option("--data", metavar="FILE", help="CSV or Parquet of new rows (its own columns)"),
    ],
    version: Annotated[
        str | None, typer.Option(metavar="VERSION", help="version number or alias to compare with")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(metavar="PNG", help="plot path (default: <data>.drift.png beside the data)"),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="features in the plot")] = 6,
    fail_on_drift: Annotated[
        bool, typer.Option("--fail-on-drift", help="exit 1 when a feature drifted")
    ] = False,
) -> None:
    """Drift of a file of new rows against a version's training data.

    Every row of FILE is compared with the training reference registered with the
    version: PSI and Jensen–Shannon per feature, shares missing / out of range /
    unseen, and whether PSI passes the feature's calibrated alert level (scaled to the
    file's row count when it has fewer rows than monitor.window). Prints a table sorted
    by drift and writes a PNG of the most drifted features."""
    from cluster.drift_view import plot, table
    from training import drift as drift_stats
    from training import registry

    name, ref = _parse_ref(model)
    ref = version or ref
    artifact = registry.load_artifact(_tracking_uri(), name, ref)
    reference = artifact.drift
    if reference is None:
        _fail(
            f"{name} version {artifact.version} has no drift reference (registered before "
            "drift monitoring); register a new version to compare with"
        )
    frame = _read_table(data)
    codes = drift_stats.codes(reference, drift_stats.frame_inputs(reference, frame))
    report = drift_stats.report(reference, codes, model=name, version=artifact.version)
    console.print(table(report))
    png = out or data.with_name(f"{data.stem}.drift.png")
    plot(reference, report, codes, png, top=top)
    if report["drifted"]:
        console.print(
            f"[bold red]{len(report['drifted'])} of {len(report['features'])} features "
            f"drifted[/]: {', '.join(report['drifted'])} (model drift score "
            f"{report['score']:.2f})"
        )
    else:
        console.print(
            f"no feature drifted: {len(report['features'])} features within their calibrated "
            f"levels (model drift score {report['score']:.2f})"
        )
    console.print(f"plot: {png}")
    if fail_on_drift and report["drifted"]:
        raise typer.Exit(1)


@app.command()
@_guard
def up(
    workers: Annotated[
        int, typer.Option(min=0, metavar="N", help="worker nodes besides the head")
    ] = 1,
    cpus_per_node: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="CPUs each node advertises")
    ] = None,
) -> None:
    """Start a local Ray cluster: a head and N worker nodes."""
    from cluster import local

    info = local.up(workers=workers, cpus_per_node=cpus_per_node, state_dir=STATE)
    console.print(f"Ray cluster at {info.address}: head + {workers} worker node(s)")


@app.command()
@_guard
def down() -> None:
    """Stop the local Ray cluster (and every endpoint on it)."""
    from cluster import local

    console.print("stopped" if local.down(STATE) else "no rayship cluster was running")


@app.command()
@_guard
def status() -> None:
    """Show the local cluster's nodes, CPUs, dashboard and ingress."""
    from cluster import local

    st = local.status(STATE)
    if st is None:
        console.print("no rayship cluster running (rayship up starts one)")
        raise typer.Exit(1)
    table = Table("node", "name", "head", "alive", "CPUs", "free")
    for n in st.nodes:
        table.add_row(
            n.node_id[:12],
            n.name,
            "yes" if n.is_head else "",
            "yes" if n.alive else "no",
            f"{n.cpus:g}",
            f"{n.cpus_available:g}",
        )
    console.print(
        f"cluster at {st.address}: {st.alive_nodes} alive node(s), {st.cpus_total:g} CPUs"
    )
    info = local.info(STATE)
    if info is not None and info.dashboard:
        console.print(f"dashboard (and `serve deploy -a`): {info.dashboard}")
    if info is not None:
        console.print(_ingress_line(info))
    console.print(table)


def _ingress_line(info) -> str:
    """How the cluster's endpoints take requests (docs/serving.md, "How a request
    reaches a replica")."""
    if info.ingress != "haproxy" or len(info.haproxy_ports) < 2:
        return (
            "ingress: Serve's Python proxy (the cluster started with RAY_SERVE_ENABLE_HA_PROXY=0)"
        )
    stats, metrics = info.haproxy_ports[:2]
    first, end = info.replica_ports or (None, None)
    replicas = f", replicas on ports {first}-{end - 1}" if first is not None else ""
    return (
        f"ingress: HAProxy -> replica (stats :{stats}/stats, Prometheus :{metrics}/metrics"
        f"{replicas})"
    )


# --------------------------------------------------------------------------- Kubernetes

k8s_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Follow rayship's RayJob and RayService."
)
app.add_typer(k8s_app, name="k8s")


Overlay = Annotated[
    str, typer.Option(metavar="NAME", help="kustomize overlay: local (kind, minikube) or prod")
]


def _rendered(spec_path: Path, overlay: str) -> list[dict]:
    from cluster import k8s

    objects, warnings = k8s.render(spec_path, overlay)
    notes = Console(stderr=True)  # stdout may be the manifests themselves
    for w in warnings:
        notes.print(f"[yellow]note:[/] {w}", soft_wrap=True)
    return objects


@app.command()
@_guard
def render(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="experiment spec (YAML)")],
    overlay: Overlay = "local",
    out: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="write one file per object and a kustomization.yaml here"),
    ] = None,
) -> None:
    """Render a spec's Kubernetes manifests.

    Its RayJob (search) and RayService (endpoint), and the overlay's namespace, RBAC,
    NetworkPolicies, PodMonitors and storage."""
    from cluster import k8s

    objects = _rendered(spec_path, overlay)
    if out is None:
        print(k8s.dump_objects(objects), end="")
        return
    files = k8s.write_manifests(objects, out)
    console.print(f"wrote {len(files)} files to {out} (kubectl apply -k {out})")


@app.command()
@_guard
def deploy(
    source: Annotated[
        Path,
        typer.Argument(metavar="SPEC|DIR", help="a spec, or a folder `rayship render` wrote"),
    ],
    overlay: Overlay = "local",
    context: Annotated[str | None, typer.Option(metavar="NAME", help="kubeconfig context")] = None,
    watch: Annotated[bool, typer.Option(help="follow the RayJob and RayService")] = False,
) -> None:
    """Apply a spec's manifests to the current Kubernetes cluster.

    Server-side apply; a finished RayJob of the same name is replaced, so the search
    runs again."""
    from cluster import k8s, k8s_apply

    objects = k8s.read_manifests(source) if source.is_dir() else _rendered(source, overlay)
    for line in k8s_apply.deploy(objects, context=context):
        console.print(f"applied {line}")
    names = [o["metadata"]["name"] for o in objects if o["kind"] in ("RayJob", "RayService")]
    if watch:
        _follow(objects, context=context, logs=True, timeout=6 * 3600.0)
    else:
        console.print(f"follow with: rayship k8s status {' '.join(names)}")


def _follow(objects: list[dict], *, context: str | None, logs: bool, timeout: float) -> None:
    ns = {o["metadata"]["name"]: o["metadata"].get("namespace", "rayship") for o in objects}
    kinds = {o["metadata"]["name"]: o["kind"] for o in objects}
    _follow_names(
        [n for n in kinds if kinds[n] == "RayJob"] + [n for n in kinds if kinds[n] == "RayService"],
        kinds,
        ns,
        context=context,
        logs=logs,
        timeout=timeout,
    )


def _follow_names(names, kinds, namespaces, *, context, logs, timeout) -> None:
    import threading

    from cluster import k8s_apply

    failed = False
    for name in names:
        kind, ns = kinds[name], namespaces[name]
        if kind == "RayJob" and logs:
            threading.Thread(
                target=k8s_apply.follow_job_log,
                args=(name, lambda line: console.print(f"[dim]{line}[/]", highlight=False)),
                kwargs={"namespace": ns, "context": context},
                daemon=True,
            ).start()
        for state in k8s_apply.watch_states(
            kind, name, namespace=ns, context=context, timeout_s=timeout
        ):
            style = "red" if state.failed else ("green" if state.done else "cyan")
            console.print(f"[{style}]{state.phase}[/] {state.message}", soft_wrap=True)
        failed = failed or state.failed
    if failed:
        raise typer.Exit(1)


@k8s_app.command("status")
@_guard
def k8s_status(
    names: Annotated[
        list[str],
        typer.Argument(
            metavar="NAME...",
            help="a spec name (its <name>-tune RayJob and <name>-serve RayService) or "
            "RayJob/RayService names",
        ),
    ],
    namespace: Annotated[
        str, typer.Option(metavar="NS", help="namespace of the objects")
    ] = "rayship",
    context: Annotated[str | None, typer.Option(metavar="NAME", help="kubeconfig context")] = None,
    logs: Annotated[bool, typer.Option(help="stream the RayJob's log")] = True,
    timeout: Annotated[
        float, typer.Option(min=1, metavar="SECONDS", help="seconds to follow each object")
    ] = 21600,
) -> None:
    """Follow a RayJob's and RayService's status until done or failed.

    The job's log is streamed too. Exits 1 on a failure state, saying what it means."""
    from cluster import k8s, k8s_apply

    kinds: dict[str, str] = {}
    for name in names:
        candidates = [name, k8s.resource_name(name, "tune"), k8s.resource_name(name, "serve")]
        for candidate in dict.fromkeys(candidates):
            for kind in ("RayJob", "RayService"):
                if k8s_apply.get_object(kind, candidate, namespace, context) is not None:
                    kinds[candidate] = kind
    if not kinds:
        _fail(f"no RayJob or RayService for {', '.join(names)} in namespace {namespace}")
    order = sorted(kinds, key=lambda n: kinds[n] != "RayJob")
    _follow_names(
        order,
        kinds,
        dict.fromkeys(kinds, namespace),
        context=context,
        logs=logs,
        timeout=timeout,
    )


if __name__ == "__main__":
    app()
