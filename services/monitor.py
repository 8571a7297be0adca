"""The drift monitor on live traffic: replicas sample what they serve, one merger per
model holds the sliding window, computes the report and exports the drift gauges.

Replica side (:class:`ReplicaMonitor`, one per served model in each replica)
    The request path only keeps a reference to the request's feeds (the
    ``dict[str, ndarray]`` keyed by ONNX input name that :mod:`services.predictor`
    builds): sampling is **per request** (``monitor.sample_rate`` is the share of
    requests counted, DESIGN.md), one ``random()`` draw when the rate is below 1, none
    at 1. Nothing else runs there: no slot codes, no actor call. A background asyncio
    task of the replica wakes every ``FLUSH_INTERVAL_S``, joins the feeds it holds
    (one ``np.concatenate`` per feature), turns them into slot codes with
    :func:`training.drift.codes` (vectorised over all rows at once) and awaits one
    ``push`` to the merger — awaited there, off the request path, so a slow merger
    slows nothing but the next flush. Feeds waiting in a replica are capped at the
    window's row count: older ones fall out of the window anyway, and are dropped
    (counted as ``dropped``), so a replica's memory, and the rows it turns into codes
    each second, are bounded whatever the traffic.
    Only the production version's traffic is counted: a canary has its own reference
    and its rows would mix two versions' slots in one window.

Merger (:class:`DriftMerger`, a Ray actor per model of the endpoint)
    Named ``rayship-drift-<route>`` in namespace ``rayship``, detached, ``num_cpus=0``,
    restarted by Ray if it dies (``max_restarts=-1``), created by the first replica that
    serves a monitored version (a model never monitored has none). Every replica of the
    model gets it with ``get_if_exists`` and pushes to it, so the window covers all
    replicas' traffic. Detached, because it must outlive the replica that happened to create it:
    a replica restart, a downscale or a redeploy with new code keeps the window. A
    model removed from the endpoint leaves its merger (a few kB) until the cluster
    stops or it is killed by name.

    It holds a ring buffer of the last ``window`` rows' codes (int16, ``window x
    n_features``: memory fixed when the version is registered with it) for **one**
    version: the production version last configured. Each replica registers its
    production version (with the reference and the time it configured it) on
    reconfigure; a registration of another version resets the window against that
    version's reference, unless it is older than the registration the merger holds (a
    replica of an old deployment still draining), which is refused. Pushes of another
    version are refused too; a replica whose push is refused because the merger lost
    its state (it restarted) registers again. A new production version (promote, hot
    swap, rollback) therefore restarts the window; a restarted replica of the same
    version does not. (The registration times are the replicas' wall clocks: nodes of
    one cluster are assumed to agree to well under a deploy's duration.)

    The window's size is the reference's ``window`` (``monitor.window`` of the spec
    the version was trained with): the alert levels were calibrated for windows of
    that size (:mod:`training.drift`). ``sample_rate`` comes from the same spec, or
    from the endpoint's ``user_config`` per model (``monitor: {sample_rate}``), where
    0 turns the monitor off for that model.

Cost (``benchmarks/monitor_cost.py``, one replica, 2 cores, wrk at concurrency 8, on vs
off alternating, medians of 3 runs): one-row requests 2.5% fewer requests/s, 3.4% more
CPU a request (replica and merger; the three runs' throughput cost spread from -0.3% to
4.6%); 64-row requests -0.2% and 0.4%.

Gauges (set by the merger on each report and every ``GAUGE_INTERVAL_S`` while new rows
arrive; Ray's exporter adds the ``ray_`` prefix) — ``feature`` is the data's column name:
``rayship_feature_drift_psi``, ``rayship_feature_drift_js``,
``rayship_feature_drift_threshold``, ``rayship_feature_drifted`` (0/1) by
model, version, feature; ``rayship_model_drift_score`` and ``rayship_drift_window_rows``
by model, version. When the merger leaves a version, that version's series are set to
0 rows, nothing drifted, PSI/JS/score 0 (Ray cannot remove a series), so an alert on
``rayship_feature_drifted == 1`` stops for a version no longer served.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("ray.serve")

NAMESPACE = "rayship"
FLUSH_INTERVAL_S = 1.0
GAUGE_INTERVAL_S = 2.0
CALL_TIMEOUT_S = 30.0
DEFAULT_WINDOW = 1000
MAX_SOURCES = 64  # replicas remembered in the merger's per-source row counts


def merger_name(route: str) -> str:
    """The Ray actor name of a model's merger."""
    return f"rayship-drift-{route}"


@dataclass(frozen=True)
class MonitorSettings:
    """How a model's traffic is monitored: the share of requests sampled and the
    window's row count."""

    sample_rate: float
    window: int


def settings_for(
    reference: dict[str, Any] | None, spec_yaml: str, override: dict[str, Any] | None
) -> MonitorSettings | None:
    """The monitor settings of a version, or None when it is not monitored (no drift
    reference, or a sample rate of 0). The window is the reference's (what its levels
    were calibrated for); the sample rate is ``override["sample_rate"]`` if given, else
    the version's spec ``monitor.sample_rate``, else 1."""
    if not reference:
        return None
    rate = (override or {}).get("sample_rate")
    monitor: dict[str, Any] = {}
    if spec_yaml:
        import yaml

        monitor = (yaml.safe_load(spec_yaml) or {}).get("monitor") or {}
    if rate is None:
        rate = monitor.get("sample_rate", 1.0)
    window = int(reference.get("window") or monitor.get("window") or DEFAULT_WINDOW)
    if float(rate) <= 0:
        return None
    return MonitorSettings(sample_rate=min(1.0, float(rate)), window=window)


class RingBuffer:
    """The codes of the last ``window`` rows (int16, ``window x width``), in fixed memory."""

    def __init__(self, window: int, width: int):
        self.rows = np.zeros((window, width), dtype=np.int16)
        self.head = 0  # next row to write
        self.filled = 0

    def push(self, codes: np.ndarray) -> None:
        """Append rows, overwriting the oldest beyond ``window``."""
        window = len(self.rows)
        codes = codes[-window:]
        n = len(codes)
        if n == 0:
            return
        end = self.head + n
        if end <= window:
            self.rows[self.head : end] = codes
        else:
            first = window - self.head
            self.rows[self.head :] = codes[:first]
            self.rows[: n - first] = codes[first:]
        self.head = end % window
        self.filled = min(window, self.filled + n)

    def view(self) -> np.ndarray:
        """The rows held (order does not matter to a report)."""
        return self.rows[: self.filled]

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)


class DriftMerger:
    """The window of one model's traffic across replicas (see the module docstring).
    Run as a Ray actor by :func:`get_merger`; plain methods, so Ray runs one at a time
    except the gauge ticker, which only reads."""

    def __init__(self, model: str):
        from ray.util.metrics import Gauge

        self.model = model
        self.version: str | None = None
        self.reference: dict[str, Any] | None = None
        self.configured_at = 0.0
        self.buffer: RingBuffer | None = None
        self.seen = 0  # rows sampled for this version (pushed or dropped by replicas)
        self.dropped = 0
        self.sources: dict[str, int] = {}
        self.changed = False  # rows arrived since the gauges were last set
        self.ticker: asyncio.Task | None = None
        feature_tags = ("model", "version", "feature")
        self.gauges = {
            "psi": Gauge(
                "rayship_feature_drift_psi",
                description="PSI of a feature's live window against its training reference.",
                tag_keys=feature_tags,
            ),
            "js": Gauge(
                "rayship_feature_drift_js",
                description="Jensen-Shannon distance of a feature's live window (base 2).",
                tag_keys=feature_tags,
            ),
            "threshold": Gauge(
                "rayship_feature_drift_threshold",
                description="A feature's calibrated PSI alert level at the window's size.",
                tag_keys=feature_tags,
            ),
            "drifted": Gauge(
                "rayship_feature_drifted",
                description="1 when a feature's PSI passes its calibrated alert level.",
                tag_keys=feature_tags,
            ),
        }
        self.score = Gauge(
            "rayship_model_drift_score",
            description="Importance-weighted PSI in units of each feature's alert level.",
            tag_keys=("model", "version"),
        )
        self.window_rows = Gauge(
            "rayship_drift_window_rows",
            description="Rows in the model's live drift window.",
            tag_keys=("model", "version"),
        )

    async def register(
        self, version: str, reference: dict[str, Any] | None, window: int, configured_at: float
    ) -> bool:
        """Serve ``version`` (``reference`` None: stop monitoring). Another version resets
        the window; a registration older than the one held is refused (returns False)."""
        self._start_ticker()
        if configured_at < self.configured_at:
            return False
        self.configured_at = configured_at
        if version == self.version and (reference is None) == (self.reference is None):
            return True
        self._retire()
        self.version, self.reference = version, reference
        if reference is not None:
            self.buffer = RingBuffer(window, len(reference["features"]))
            self._publish(self._report())
        return True

    async def push(self, version: str, codes: np.ndarray, dropped: int, source: str) -> bool:
        """Add a replica's sampled rows. False when this merger does not serve
        ``version`` with a reference: the replica should register (again)."""
        if version != self.version or self.buffer is None:
            return False
        self.buffer.push(codes)
        self.seen += len(codes) + dropped
        self.dropped += dropped
        if source in self.sources or len(self.sources) < MAX_SOURCES:
            self.sources[source] = self.sources.get(source, 0) + len(codes) + dropped
        self.changed = True
        return True

    async def report(self) -> dict[str, Any] | None:
        """The report of the window (and the gauges set from it); None when no version
        with a reference is registered."""
        if self.buffer is None:
            return None
        report = self._report()
        self._publish(report)
        return report

    async def stats(self) -> dict[str, Any]:
        """What the merger holds, for tests and debugging: version, rows in the window,
        rows seen and dropped, rows per replica, the ring buffer's bytes, the pid."""
        import os

        return {
            "model": self.model,
            "version": self.version,
            "window_rows": self.buffer.filled if self.buffer else 0,
            "window": len(self.buffer.rows) if self.buffer else 0,
            "seen": self.seen,
            "dropped": self.dropped,
            "sources": dict(self.sources),
            "buffer_bytes": self.buffer.nbytes if self.buffer else 0,
            "pid": os.getpid(),
        }

    # -- internals -------------------------------------------------------------------

    def _report(self) -> dict[str, Any]:
        from training import drift

        assert self.buffer is not None and self.reference is not None
        return drift.report(
            self.reference, self.buffer.view(), model=self.model, version=self.version or ""
        )

    def _publish(self, report: dict[str, Any]) -> None:
        """Set the gauges from a report."""
        model, version = self.model, str(report["version"])
        for feature in report["features"]:
            tags = {"model": model, "version": version, "feature": feature["name"]}
            self.gauges["psi"].set(feature["psi"], tags=tags)
            self.gauges["js"].set(feature["js"], tags=tags)
            self.gauges["threshold"].set(feature["threshold"], tags=tags)
            self.gauges["drifted"].set(1.0 if feature["drifted"] else 0.0, tags=tags)
        self.score.set(report["score"], tags={"model": model, "version": version})
        self.window_rows.set(report["window_rows"], tags={"model": model, "version": version})
        self.changed = False

    def _retire(self) -> None:
        """Zero the series of the version being left; forget its window."""
        if self.version is not None and self.reference is not None:
            model, version = self.model, self.version
            for ref in self.reference["features"]:
                tags = {"model": model, "version": version, "feature": ref["column"]}
                for key in ("psi", "js", "drifted"):
                    self.gauges[key].set(0.0, tags=tags)
            self.score.set(0.0, tags={"model": model, "version": version})
            self.window_rows.set(0, tags={"model": model, "version": version})
        self.buffer, self.seen, self.dropped, self.sources = None, 0, 0, {}
        self.changed = False

    def _start_ticker(self) -> None:
        if self.ticker is None:
            self.ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Every GAUGE_INTERVAL_S: the gauges from a fresh report if rows arrived."""
        while True:
            await asyncio.sleep(GAUGE_INTERVAL_S)
            if self.changed and self.buffer is not None:
                try:
                    self._publish(self._report())
                except Exception:  # a bad reference must not stop the ticker
                    logger.exception("%s: drift gauges not updated", self.model)


def get_merger(route: str) -> Any:
    """The handle of ``route``'s merger, created if it does not exist (by whichever
    replica asks first; ``get_if_exists`` makes that race-free)."""
    import ray

    actor = ray.remote(DriftMerger)
    return actor.options(
        name=merger_name(route),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_concurrency=8,
    ).remote(route)


def _exists(route: str) -> bool:
    """Whether ``route``'s merger exists (without creating it)."""
    import ray

    try:
        ray.get_actor(merger_name(route), namespace=NAMESPACE)
    except Exception:  # ValueError: no such actor
        return False
    return True


class ReplicaMonitor:
    """One model's sampling in one replica (see the module docstring). :meth:`observe`
    is on the request path; everything else runs in the replica's event loop beside it."""

    def __init__(self, route: str, source: str):
        self.route = route
        self.source = source  # the replica's id, for the merger's per-replica counts
        self.version: str | None = None
        self.reference: dict[str, Any] | None = None
        self.settings: MonitorSettings | None = None
        self.configured_at = 0.0
        self.pending: deque[tuple[dict[str, np.ndarray], int]] = deque()
        self.pending_rows = 0
        self.dropped = 0
        self.rate = 0.0  # 0: off
        self._random = random.Random().random
        self._merger: Any = None
        self._registered: asyncio.Future | None = None
        self._flusher: asyncio.Task | None = None

    # -- request path ----------------------------------------------------------------

    def observe(self, version: str, feeds: dict[str, np.ndarray]) -> None:
        """Keep a request's feeds for the next flush (production version only, sampled
        per request). Constant time; never waits for anything."""
        if version != self.version or self.rate <= 0.0:
            return
        if self.rate < 1.0 and self._random() >= self.rate:
            return
        rows = len(next(iter(feeds.values())))
        self.pending.append((feeds, rows))
        self.pending_rows += rows
        window = self.settings.window  # type: ignore[union-attr]
        while self.pending_rows - self.pending[0][1] >= window:
            _, n = self.pending.popleft()
            self.pending_rows -= n
            self.dropped += n

    # -- configuration -----------------------------------------------------------------

    def configure(
        self, version: str, reference: dict[str, Any] | None, settings: MonitorSettings | None
    ) -> None:
        """Monitor ``version`` from now on (``settings`` None: not at all). Registration
        with the merger runs as a task; :meth:`report` waits for it."""
        if (version, settings) == (self.version, self.settings) and reference is self.reference:
            return
        self.version, self.reference, self.settings = version, reference, settings
        self.rate = settings.sample_rate if settings else 0.0
        self.configured_at = time.time()
        self.pending.clear()
        self.pending_rows = self.dropped = 0
        loop = asyncio.get_running_loop()
        self._registered = loop.create_task(self._register())
        if self._flusher is None and settings is not None:
            self._flusher = loop.create_task(self._flush_forever())

    def close(self) -> None:
        """Stop the flush task (the model left this endpoint)."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None

    # -- merger ------------------------------------------------------------------------

    def _handle(self) -> Any:
        if self._merger is None:
            self._merger = get_merger(self.route)
        return self._merger

    async def _call(self, method: str, *args: Any) -> Any:
        ref = getattr(self._handle(), method).remote(*args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), CALL_TIMEOUT_S)
        except Exception:
            self._merger = None  # get it again next time (restarted, or recreated)
            raise

    async def _register(self) -> bool:
        settings = self.settings
        window = settings.window if settings else 0
        reference = self.reference if settings else None
        if settings is None and self._merger is None:
            if not await asyncio.to_thread(_exists, self.route):
                return True  # not monitored; no merger holds an earlier version to retire
        try:
            return bool(
                await self._call("register", self.version, reference, window, self.configured_at)
            )
        except Exception as exc:
            logger.warning("%s: drift monitor not registered: %s", self.route, exc)
            return False

    async def flush(self) -> None:
        """Send the sampled rows held here to the merger, as slot codes."""
        if not self.pending or self.settings is None:
            return
        from training import drift

        batch, dropped = list(self.pending), self.dropped
        self.pending.clear()
        self.pending_rows = self.dropped = 0
        version, reference = self.version, self.reference
        names = list(batch[0][0])
        joined = {name: np.concatenate([feeds[name] for feeds, _ in batch]) for name in names}
        codes = drift.codes(reference, joined)
        # Registration first: Ray does not keep the order of calls to an async actor.
        if self._registered is not None:
            await self._registered
        if await self._call("push", version, codes, dropped, self.source):
            return
        if version == self.version:  # the merger lost its state (restarted): register again
            self._registered = asyncio.get_running_loop().create_task(self._register())
            if await self._registered:
                await self._call("push", version, codes, dropped, self.source)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("%s: drift rows not sent: %s", self.route, exc)

    async def report(self) -> dict[str, Any] | None:
        """The merger's report (after this replica's registration completed and its
        held rows were sent); None when the merger holds no reference."""
        if self._registered is not None:
            await self._registered
        await self.flush()
        report = await self._call("report")
        if report is None and self.settings is not None:
            # the merger restarted and lost its state: register and ask again
            self._registered = asyncio.get_running_loop().create_task(self._register())
            await self._registered
            report = await self._call("report")
        return report
