"""The ``rayship`` CLI run as a user runs it, in a process of its own, importing this
checkout's code (a module of its own, shared by the CLI test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rayship(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``rayship ARGS`` in ``cwd``; output captured, wide enough for rich's tables."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
