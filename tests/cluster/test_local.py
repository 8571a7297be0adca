"""cluster.local against real processes: up → status → a task on the worker node → down.

One cluster (head + 1 worker node) serves the whole module; the fixture's finaliser
takes it down even when a test fails. About 25 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import local

DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster import local

    desc = local.connect(Path(sys.argv[1]), log_to_driver=False)
    head = next(n["NodeID"] for n in ray.nodes()
                if n["Alive"] and "node:__internal_head__" in n["Resources"])
    worker = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)

    @ray.remote(num_cpus=1)
    def where():
        import training  # the project must import inside Ray workers too
        return ray.get_runtime_context().get_node_id(), training.__file__

    pinned = NodeAffinitySchedulingStrategy(worker, soft=False)
    ran_on, training_file = ray.get(where.options(scheduling_strategy=pinned).remote())
    print(json.dumps({"desc": desc, "head": head, "worker": worker,
                      "ran_on": ran_on, "training": training_file}))
    """
)


def _processes_of(info: local.ClusterInfo) -> list[str]:
    """Live (non-zombie) processes in the cluster's sessions or naming its temp dir."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, _ppid, _pgrp, sid = stat[stat.rindex(b")") + 2 :].split()[:4]
        if state in (b"Z", b"X"):
            continue
        if int(sid) in info.session_ids or info.temp_dir in cmd:
            found.append(f"{entry.name}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, local.ClusterInfo]]:
    state_dir = tmp_path_factory.mktemp("rayship") / "state"
    info = local.up(workers=1, state_dir=state_dir)
    try:
        yield state_dir, info
    finally:
        local.down(state_dir)


def test_nothing_recorded(tmp_path: Path) -> None:
    assert local.status(tmp_path) is None
    assert local.down(tmp_path) is False


def test_status_shows_head_and_worker(cluster: tuple[Path, local.ClusterInfo]) -> None:
    state_dir, info = cluster
    recorded = json.loads((state_dir / "cluster.json").read_text())
    assert recorded["address"] == info.address
    assert recorded["auth_mode"] == "token"
    assert Path(recorded["token_path"]).stat().st_mode & 0o077 == 0

    st = local.status(state_dir)
    assert st is not None
    assert st.address == info.address
    assert st.alive_nodes == 2
    assert [n.is_head for n in st.nodes] == [True, False]
    assert len({n.node_id for n in st.nodes}) == 2
    assert all(n.alive and n.cpus >= 1 for n in st.nodes)
    assert st.cpus_total == sum(n.cpus for n in st.nodes)


def test_connect_from_separate_driver_runs_task_on_worker_node(
    cluster: tuple[Path, local.ClusterInfo], tmp_path: Path
) -> None:
    state_dir, info = cluster
    # No inherited Ray settings: connect() must find the address and the token itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(state_dir)],
        cwd=tmp_path,  # not the repo root: imports must come from the install
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["desc"] == f"cluster at {info.address} (2 nodes)"
    assert out["ran_on"] == out["worker"] != out["head"]
    assert out["training"].endswith(os.path.join("training", "__init__.py"))


def test_second_up_is_refused(cluster: tuple[Path, local.ClusterInfo]) -> None:
    state_dir, info = cluster
    with pytest.raises(local.ClusterError, match="already running") as err:
        local.up(workers=1, state_dir=state_dir)
    assert info.address in str(err.value)
    assert local.status(state_dir) is not None  # the refusal left the cluster alone


def test_down_stops_all_its_processes(cluster: tuple[Path, local.ClusterInfo]) -> None:
    state_dir, info = cluster
    assert _processes_of(info)  # sanity: the probe sees the running cluster
    assert local.down(state_dir) is True
    assert _processes_of(info) == []
    assert local.status(state_dir) is None
    assert not (state_dir / "cluster.json").exists()
    assert not Path(info.temp_dir).exists()
    assert local.down(state_dir) is False
