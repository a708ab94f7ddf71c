"""`refany3d build --partitions N` stops in one line (exit 2) where it cannot run: no Prefect API to
reach workers through, or N below 1; `deploy` refuses a zombie window no longer than a heartbeat. (With a server: tests/flows/test_partitioned.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.s200k import Row, write_subjects200k


def _build(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    write_subjects200k(tmp_path / "rows.parquet", [Row(seed=0)])
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    args = [
        "build",
        "--data-files",
        str(tmp_path / "rows.parquet"),
        "--out",
        str(tmp_path / "out"),
        "--until",
        "split",
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "refany3d.cli", *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--partitions", "2"],
            "refany3d build: error: --partitions: no Prefect API; start a server, set PREFECT_API_URL",
        ),
        (["--partitions", "0"], "refany3d build: error: --partitions: 0 is not a positive number"),
    ],
)
def test_build_partitions_that_cannot_run_exit_2_in_one_line(tmp_path, extra, message):
    done = _build(tmp_path, *extra)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_deploy_zombie_window_shorter_than_a_heartbeat_exits_2_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run([sys.executable, "-m", "refany3d.cli", "deploy", "--zombie-after", "20"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("refany3d deploy: error: --zombie-after: 20 s")
    assert done.stderr.count("\n") == 1
