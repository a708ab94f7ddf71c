"""The docker files and install scripts (no docker engine here): compose parses and wires
PostgreSQL, the Prefect server and both workers, takes every secret from the environment and
publishes on loopback; the images and scripts/setup.sh install through the same shared scripts."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SCRIPTS = ROOT / "scripts"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
INSTALL_SCRIPTS = (
    "scripts/install_system_deps.sh",
    "scripts/install_python_deps.sh",
    "scripts/prepare_lpips.sh",
)
SECRETS = {"POSTGRES_PASSWORD", "PREFECT_AUTH_STRING"}
SECRET_NAME = re.compile(r"PASSWORD|AUTH_STRING|SECRET|TOKEN|API_KEY")
RENDERER_LIBS = {"libegl1", "libgl1", "libglu1-mesa", "libegl-mesa0", "libgl1-mesa-dri"}


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


# --------------------------------------------------------------------------- compose interpolation

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?+])([^}]*))?\}|\$(\w+)")


def _interpolate(text: str, env: dict[str, str], missing: set[str]) -> str:
    """`text` with compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` (and `-`, `?`, `+`
    forms, `$$`) resolved from `env`; names of required variables that are unset go to `missing`."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2) or "", match.group(3) or ""
        value = env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset else value
        if op.endswith("?"):
            if unset:
                missing.add(name)
                return ""
            return value
        if op.endswith("+"):
            return "" if unset else arg
        return value or ""

    return _VAR.sub(one, text)


def _resolve(node, env: dict[str, str], missing: set[str]):
    if isinstance(node, str):
        return _interpolate(node, env, missing)
    if isinstance(node, dict):
        return {k: _resolve(v, env, missing) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, env, missing) for v in node]
    return node


def _resolved(env: dict[str, str]) -> tuple[dict, set[str]]:
    missing: set[str] = set()
    return _resolve(_compose(), env, missing), missing


def _variables(node) -> set[str]:
    """Every variable `node` (compose.yaml's values, not its comments) reads from the environment."""
    if isinstance(node, str):
        return {m.group(1) or m.group(4) for m in _VAR.finditer(node) if m.group(0) != "$$"}
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return set().union(*(_variables(v) for v in values))


def _env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


# --------------------------------------------------------------------------- compose


def test_compose_wires_postgres_server_and_workers():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "worker-cpu", "worker-gpu", "deploy"} <= set(services)
    server = services["prefect-server"]
    assert server["environment"]["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert server["environment"]["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, pool in (("worker-cpu", "cpu"), ("worker-gpu", "gpu"), ("worker-control", "control")):
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


def test_compose_refuses_to_start_without_its_secrets():
    _, missing = _resolved({})
    assert missing == SECRETS
    # An empty value (an unedited copy of .env.example) is refused too.
    _, missing = _resolved(dict.fromkeys(SECRETS, ""))
    assert missing == SECRETS


def test_compose_has_no_literal_secrets():
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "a URL with a password in it"
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                # The whole value is one required variable: no default, nothing literal around it.
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}: {key}={value!r}"


def test_compose_server_and_clients_share_the_auth_string_and_password():
    compose, missing = _resolved({"POSTGRES_PASSWORD": "pw-1", "PREFECT_AUTH_STRING": "ops:s3cret"})
    assert not missing
    services = compose["services"]
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == "ops:s3cret"
    for client in ("worker-cpu", "worker-gpu", "deploy"):
        assert services[client]["environment"]["PREFECT_API_AUTH_STRING"] == "ops:s3cret", client
    postgres = services["postgres"]["environment"]
    assert server["PREFECT_SERVER_DATABASE_PASSWORD"] == postgres["POSTGRES_PASSWORD"] == "pw-1"
    assert server["PREFECT_SERVER_DATABASE_USER"] == postgres["POSTGRES_USER"] == "prefect"


def test_compose_publishes_on_loopback_unless_the_operator_opts_in():
    secrets = dict.fromkeys(SECRETS, "x")
    services = _resolved(secrets)[0]["services"]
    assert services["prefect-server"]["ports"] == ["127.0.0.1:4200:4200"]
    opted = _resolved({**secrets, "PREFECT_BIND": "10.0.0.5", "PREFECT_PORT": "8420"})[0]["services"]
    assert opted["prefect-server"]["ports"] == ["10.0.0.5:8420:4200"]
    assert [s for s, spec in services.items() if "ports" in spec] == ["prefect-server"]


def test_env_example_documents_every_variable_and_leaves_secrets_empty():
    example = _env_example()
    assert set(example) == _variables(_compose())
    assert all(example[name] == "" for name in SECRETS)
    lines = (DOCKER / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f".env.example: {line!r} has no comment above it"


def test_env_files_are_ignored_by_git_and_docker():
    if (ROOT / ".git").exists():
        for path in ("docker/.env", ".env"):
            assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and "**/.env" in ignored


# --------------------------------------------------------------------------- images and install path


def _run_lines(dockerfile: str) -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined."""
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.startswith("RUN ")]


def test_dockerfiles_install_the_package_and_start_their_pool():
    for name, pool in (("Dockerfile.cpu", "cpu"), ("Dockerfile.gpu", "gpu")):
        text = (DOCKER / name).read_text()
        for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
            for path in src.split():
                assert (ROOT / path).exists(), f"{name}: COPY {path} is not in the repository"
        assert re.search(r"install_python_deps\.sh \S+ \.(\s|$)", text), name
        assert f'"--pool", "{pool}"' in text and "PYOPENGL_PLATFORM=egl" in text
    assert "nvidia/cuda" in (DOCKER / "Dockerfile.gpu").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_install_through_the_shared_scripts(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    copied = " ".join(re.findall(r"^COPY (.+) \S+$", text, flags=re.M)).split()
    runs = _run_lines(dockerfile)
    for script in INSTALL_SCRIPTS:
        assert script in copied, f"{dockerfile} does not copy {script}"
        assert any(f"bash {script}" in run for run in runs), f"{dockerfile} does not run {script}"
    for run in runs:
        assert not re.search(r"\bpip3? install\b|\bapt-get install\b|\bapt install\b", run), (
            f"{dockerfile} installs outside the shared scripts: {run}"
        )


def test_setup_installs_through_the_shared_scripts_and_stamps_them():
    text = (SCRIPTS / "setup.sh").read_text()
    assert not re.search(r"\bpip3? install\b|\bapt-get install\b", text)
    called = set(re.findall(r"^\s*bash (scripts/\S+\.sh)", text, flags=re.M))
    assert called == set(INSTALL_SCRIPTS)
    # The stamp that makes setup.sh skip reinstalling hashes every file that decides the install.
    stamped = re.search(r"want=\$\(cat (.+?)\|\s*sha256sum", text.replace("\\\n", " "), flags=re.S)
    assert stamped and set(stamped.group(1).split()) == {"pyproject.toml", "scripts/setup.sh", *called}


def _fake_bin(tmp_path: Path, tools: dict[str, str]) -> dict[str, str]:
    """PATH with executables `name` running the shell `body`, ahead of the real ones."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_install_python_deps_installs_the_package_then_the_undeclared_without_deps(tmp_path):
    log = tmp_path / "pip.log"
    env = _fake_bin(tmp_path, {"fakepython": f'echo "$*" >> {log}'})
    subprocess.run(
        ["bash", SCRIPTS / "install_python_deps.sh", "fakepython", "-e", ".[dev]"], env=env, check=True
    )
    calls = log.read_text().splitlines()
    assert all(c.startswith("-m pip install -q ") for c in calls)
    args = [c.removeprefix("-m pip install -q ") for c in calls]
    assert args[:2] == ["--upgrade pip setuptools wheel", "-e .[dev]"]
    assert "--no-deps pyrender==0.1.45" in args and "--no-deps groundingdino-py==0.4.0" in args
    assert all("--no-deps" in a for a in args if "pyrender" in a or "groundingdino" in a)

    log.unlink()
    subprocess.run(["bash", SCRIPTS / "install_python_deps.sh", "fakepython"], env=env, check=True)
    assert log.read_text().splitlines()[1] == "-m pip install -q ."


def test_install_system_deps_installs_the_renderer_libraries_that_are_missing(tmp_path):
    log = tmp_path / "apt.log"
    env = _fake_bin(
        tmp_path,
        {
            # Everything is installed except libgl1 and libglu1-mesa.
            "dpkg-query": 'case "$3" in libgl1|libglu1-mesa) exit 1;; *) echo "install ok installed";; esac',
            "apt-get": f'echo "$*" >> {log}',
            "id": "echo 0",
        },
    )
    subprocess.run(["bash", SCRIPTS / "install_system_deps.sh", "chromium"], env=env, check=True)
    assert log.read_text().splitlines() == [
        "update -qq",
        "install -y -qq --no-install-recommends libgl1 libglu1-mesa",
    ]
    text = (SCRIPTS / "install_system_deps.sh").read_text()
    block = re.search(r"RUNTIME_PACKAGES=\((.*?)\n\)", text, flags=re.S).group(1)
    listed = {word for line in block.splitlines() for word in line.split("#")[0].split()}
    assert RENDERER_LIBS <= listed


def test_install_system_deps_does_nothing_when_all_are_installed(tmp_path):
    log = tmp_path / "apt.log"
    env = _fake_bin(
        tmp_path,
        {"dpkg-query": 'echo "install ok installed"', "apt-get": f'echo "$*" >> {log}', "id": "echo 0"},
    )
    subprocess.run(["bash", SCRIPTS / "install_system_deps.sh"], env=env, check=True)
    assert not log.exists()
