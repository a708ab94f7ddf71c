"""Kill a build mid-run (SIGKILL), run it again: same shards as an uninterrupted build, no sample
lost or duplicated, and the tasks that had finished are not recomputed (real server, real CLI)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.flows._runs import shard_bytes, shard_ids, task_runs
from tests.flows.conftest import BIN
from tests.s200k import Row, write_subjects200k

pytestmark = pytest.mark.slow
ROWS = 24


def _build(server, files: str, out: Path) -> list[str]:
    return [str(BIN / "refany3d"), "build", "--data-files", files, "--until", "split", "--out", str(out),
            "--set", "runtime.batch_size=1", "--name", "resume-test"]  # fmt: skip


def test_build_dataset_resumes_after_sigkill_without_recomputing(prefect_server, tmp_path):
    (tmp_path / "src").mkdir()
    write_subjects200k(tmp_path / "src" / "rows.parquet", [Row(seed=i) for i in range(ROWS)])
    files = str(tmp_path / "src" / "*.parquet")
    env = prefect_server.env
    ref = subprocess.run(
        _build(prefect_server, files, tmp_path / "ref"), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "out"
    results = out / ".prefect-results"
    victim = subprocess.Popen(_build(prefect_server, files, out), env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while victim.poll() is None and time.monotonic() < deadline:
        if results.exists() and len(os.listdir(results)) >= 30:  # about a third of the 4 x 24 tasks
            os.killpg(victim.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert victim.wait(30) == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "stats.json").exists()
    finished = {p.name for p in results.iterdir() if not p.name.startswith(".")}

    rerun = subprocess.run(_build(prefect_server, files, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "CancelledError" not in rerun.stderr
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", rerun.stdout).group(1)

    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")  # byte-identical shard set
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == 2 * ROWS  # nothing duplicated, nothing lost
    with prefect_server.client() as client:
        runs = task_runs(client, run_id, expect=4 * ROWS)
    # A task's persisted result is named by its cache key: map result file -> state in the rerun.
    states = {Path(t.state.data.storage_key).name: t.state.name for t in runs}
    assert len(runs) == 4 * ROWS and finished <= set(states)
    assert {states[key] for key in finished} == {"Cached"}  # finished before the kill: not recomputed
    assert set(states.values()) <= {"Cached", "Completed"}
