"""What ``rayship drift`` shows: a rich table of a drift report, sorted by drift, and a
PNG of the most drifted features (training vs new shares per slot).

The statistics themselves are training.drift's; this module only presents them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table


def ranked(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's features by drift: PSI in units of its alert level, highest first."""
    return sorted(
        report["features"],
        key=lambda f: f["psi"] / f["threshold"] if f["threshold"] > 0 else 0.0,
        reverse=True,
    )


def table(report: Mapping[str, Any]) -> Table:
    """One row a feature, most drifted first; drifted ones marked in red."""
    t = Table(
        "feature",
        "kind",
        "PSI",
        "level",
        "PSI/level",
        "JS",
        "missing",
        "out of range",
        "unseen",
        "importance",
        "drifted",
        title=f"{report['model']} version {report['version']}: {report['window_rows']} rows",
    )
    for f in ranked(report):
        ratio = f["psi"] / f["threshold"] if f["threshold"] > 0 else 0.0
        style = "bold red" if f["drifted"] else None
        t.add_row(
            f["name"],
            f["kind"],
            f"{f['psi']:.4f}",
            f"{f['threshold']:.4f}",
            f"{ratio:.2f}",
            f"{f['js']:.3f}",
            f"{f['missing']:.1%}",
            f"{f['out_of_range']:.1%}",
            f"{f['unseen']:.1%}",
            f"{f['importance']:.3f}",
            "DRIFT" if f["drifted"] else "",
            style=style,
        )
    return t


def plot(
    reference: Mapping[str, Any],
    report: Mapping[str, Any],
    codes: np.ndarray,
    path: Path,
    *,
    top: int = 6,
) -> Path:
    """Write a PNG of the ``top`` most drifted features: per slot, the training share and
    the new data's share side by side, titled with PSI and its level. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.drift import n_slots, slot_labels

    index = {f["column"]: i for i, f in enumerate(reference["features"])}
    shown = ranked(report)[:top]
    cols = min(3, max(len(shown), 1))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    slots = n_slots(reference)
    for ax, f in zip(axes.flat, shown, strict=False):
        i = index[f["name"]]
        ref = reference["features"][i]
        observed = np.bincount(codes[:, i], minlength=slots[i])[: slots[i]] / max(len(codes), 1)
        labels = slot_labels(ref)
        x = np.arange(len(labels))
        ax.bar(x - 0.2, ref["expected"], width=0.4, label="training", color="#4c72b0")
        ax.bar(x + 0.2, observed, width=0.4, label="new data", color="#dd8452")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("share of rows")
        mark = "  DRIFT" if f["drifted"] else ""
        ax.set_title(
            f"{f['name']}{mark}\nPSI {f['psi']:.3f} (level {f['threshold']:.3f})",
            fontsize=9,
            color="#c0392b" if f["drifted"] else "black",
        )
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(
        f"{report['model']} version {report['version']}: {report['window_rows']} rows, "
        f"{len(report['drifted'])} of {len(report['features'])} features drifted",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
