"""deploy/compose, read as compose reads it (no Docker here): Kafka's data on its volume, a buildable streamssl
image, Prometheus with the alert rules scraping the trainer's metrics port, Grafana provisioned with the dashboard."""

from __future__ import annotations

import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())  # anchors and `<<` merges resolved


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → source (a named volume, or a host path resolved against the compose file's folder)."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        mounts[target] = source if not source.startswith(".") else str((COMPOSE_DIR / source).resolve())
    return mounts


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_kafka_keeps_topics_and_offsets_on_its_named_volume() -> None:
    compose = _compose()
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    # apache/kafka's default log dir is /tmp/kraft-combined-logs; the folder it prepares for data is this one.
    log_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert log_dir == "/var/lib/kafka/data"
    assert _mounts(kafka)[log_dir] in compose["volumes"]  # a named volume: it outlives `docker compose down`
    assert len(kafka["environment"]["CLUSTER_ID"]) == 22  # a base64 UUID, the same on every start


def test_the_streamssl_image_is_built_from_the_repo_or_named_by_a_variable() -> None:
    services = _compose()["services"]
    for name in ("trainer", "producer"):
        service = services[name]
        assert service["image"].startswith("${STREAMSSL_IMAGE:-"), name
        context = (COMPOSE_DIR / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file(), name


def test_prometheus_loads_the_rules_and_scrapes_the_trainers_metrics_port() -> None:
    services = _compose()["services"]
    trainer, prometheus = services["trainer"], services["prometheus"]
    mounts = _mounts(prometheus)
    config_path = next(target for target, source in mounts.items() if source == str(COMPOSE_DIR / "prometheus.yml"))
    assert config_path == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    rules = [target for target, source in mounts.items() if source == str(ROOT / "monitoring/rules/streamssl.rules.yml")]
    assert len(rules) == 1 and any(fnmatch.fnmatch(rules[0], pattern) for pattern in config["rule_files"])

    port = _arg(trainer["command"], "--metrics-port")
    assert "metrics.host=0.0.0.0" in trainer["command"]  # reachable from the Prometheus container
    assert f"{port}:{port}" in trainer["ports"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "streamssl"  # what the rules and the dashboard select on
    assert job["static_configs"][0]["targets"] == [f"trainer:{port}"]


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard() -> None:
    services = _compose()["services"]
    mounts = _mounts(services["grafana"])
    provisioning = Path(mounts["/etc/grafana/provisioning"])
    assert provisioning == COMPOSE_DIR / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == f"http://prometheus:{services['prometheus']['ports'][0].split(':')[1]}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "streamssl.yml").read_text())["providers"]
    inside = provider["options"]["path"]
    dashboards = Path(mounts[inside])  # the provider reads a folder that is mounted from the repo
    assert dashboards == ROOT / "monitoring" / "dashboards" and (dashboards / "streamssl.json").is_file()
    assert PurePosixPath(inside).is_absolute()
