"""The ``rayship`` CLI run as a user runs it, in a process of its own, importing this
checkout's code (a module of its own, shared by the CLI test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """This process's environment, importing this checkout first, wide enough for rich's
    tables, unbuffered."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def rayship(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``rayship ARGS`` in ``cwd``, run to its end; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """``rayship ARGS`` in ``cwd``, started and left running (to be killed or waited
    for); stdout and stderr together in ``.stdout``."""
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
