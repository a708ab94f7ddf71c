"""Hermetic test environment: offline hubs, caches and Prefect home under a temporary directory."""

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="refany3d-tests-")
os.environ.setdefault("HF_HOME", os.path.join(_HOME, "hf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server for the session (`tests/s3server.py`); each test takes its own bucket."""
    from tests.s3server import s3_server

    with s3_server() as server:
        yield server
