"""The docker files (no docker engine here): compose parses and wires PostgreSQL, the Prefect
server and both workers; the images install the package and start the right worker."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_wires_postgres_server_and_workers():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "worker-cpu", "worker-gpu", "deploy"} <= set(services)
    server = services["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, pool in (("worker-cpu", "cpu"), ("worker-gpu", "gpu")):
        worker = services[name]
        assert worker["command"][:3] == ["prefect", "worker", "start"] and pool in worker["command"]
        assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
        assert "data:/data" in worker["volumes"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["deploy"]["command"] == ["refany3d", "deploy"]


def test_compose_build_contexts_and_dockerfiles_exist():
    for service in _compose()["services"].values():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()


def test_dockerfiles_install_the_package_and_start_their_pool():
    for name, pool in (("Dockerfile.cpu", "cpu"), ("Dockerfile.gpu", "gpu")):
        text = (DOCKER / name).read_text()
        for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
            for path in src.split():
                assert (ROOT / path).exists(), f"{name}: COPY {path} is not in the repository"
        assert re.search(r"^RUN pip install\b.*\s\.(\s|$)", text, flags=re.M), name
        assert f'"--pool", "{pool}"' in text and "PYOPENGL_PLATFORM=egl" in text
    assert "nvidia/cuda" in (DOCKER / "Dockerfile.gpu").read_text()
