"""Fixtures of the flow tests: a Prefect test harness, a real `prefect server` on a loopback port,
process workers, and small source datasets (Subjects200K-format rows and synthetic rows)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from refany3d.testing.pgserver import free_port
from tests.s200k import Row, write_subjects200k

BIN = Path(sys.executable).parent
OFFLINE = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "INFO",
}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A throwaway Prefect API (sqlite in a temp dir) for in-process flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s200k_source(tmp_path_factory) -> str:
    """Glob of one Subjects200K-format file: 6 good rows, a corrupt image, a low score."""
    root = tmp_path_factory.mktemp("s200k")
    rows = [Row(seed=i) for i in range(6)] + [Row(seed=6, corrupt=True), Row(seed=7, scores=(5, 3, 5))]
    write_subjects200k(root / "pairs.parquet", rows)
    return str(root / "*.parquet")


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> str:
    """Glob of the embedded synthetic source (3 pair rows with ground truth), generated once."""
    from refany3d.synthetic import ensure_synthetic

    return ensure_synthetic(str(tmp_path_factory.mktemp("synthetic")), 3, 0)


@dataclass
class PrefectServer:
    """A `prefect server start` subprocess and the environment that points clients at it."""

    url: str  # http://127.0.0.1:<port>/api
    env: dict[str, str]
    log: Path

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")

    @contextlib.contextmanager
    def client(self):
        """A sync Prefect client of this server (also inside a test harness session)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.url}), get_client(sync_client=True) as client:
            yield client

    def start(self, *args: str, log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """A subprocess (own process group) with this server's environment."""
        fh = open(log, "wb")  # noqa: SIM115 - closed with the process by `stop`
        return subprocess.Popen(
            args, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group of `proc`, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A real Prefect server (sqlite under a temp PREFECT_HOME) on a free loopback port."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(OFFLINE)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "refany3d",
            "PYOPENGL_PLATFORM": "egl",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
    )
    server = PrefectServer(env["PREFECT_API_URL"], env, home / "server.log")
    proc = server.start(
        str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), log=server.log
    )
    try:
        wait_http(f"{server.url}/health", 180, proc, server.log)
        yield server
    finally:
        stop(proc)
