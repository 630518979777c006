"""A real Prometheus scrapes a live training run and evaluates the alert rules on it; every dashboard and rule
expression runs against it without an error."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamssl.pipeline.images import Trainer
from tests.conftest import free_port, tiny_config
from tests.monitoring.test_rules_and_dashboard import RULES, alerts, dashboard_exprs

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None or shutil.which("promtool") is None,
                                reason="prometheus/promtool not on PATH (`make tools` installs Debian's prometheus)")


def _get(url: str) -> Any:
    """The API's JSON answer; a refused query's too (HTTP 400 with the error in its body)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def _query(api: str, expr: str) -> Any:
    return _get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def _wait(what: str, seconds: float, check: Any) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture
def training(tmp_path: Path, small_lake: Path, one_thread: None) -> Iterator[int]:
    """A run training in this process with its exporter on a free port (yielded), stopped afterwards."""
    port = free_port()
    trainer = Trainer(tiny_config(tmp_path / "run", small_lake, f"metrics.port={port}", "checkpoint.every_steps=3",
                                  "train.log_every_seconds=0.5", "train.max_steps=100000"))
    thread = threading.Thread(target=trainer.run)
    thread.start()
    try:
        yield port
    finally:
        trainer.stop.set()
        thread.join(timeout=60)


@pytest.fixture
def prometheus(tmp_path: Path, training: int) -> Iterator[str]:
    """Prometheus scraping the run every second and loading the rules; its API's base URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "streamssl", "static_configs": [{"targets": [f"127.0.0.1:{training}"]}]}],
    }))
    web = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{web}"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{web}"
    try:
        _wait("Prometheus to be ready", 20, lambda: process.poll() is None and
              urllib.request.urlopen(f"{api}/-/ready", timeout=2).status == 200)
        yield api
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_prometheus_reads_the_live_runs_steps_and_evaluates_every_rule(prometheus: str, training: int) -> None:
    api = prometheus

    def steps() -> float:
        result = _query(api, 'streamssl_steps_total{job="streamssl"}')["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    assert _wait("a scraped step count", 30, steps) > 0
    assert _wait("a later, higher count", 20, lambda: (lambda first: _wait("", 10, lambda: steps() > first))(steps()))
    up = _query(api, 'up{job="streamssl"}')["data"]["result"]
    assert [float(sample["value"][1]) for sample in up] == [1.0]

    # Every expression the dashboard and the rules hold runs on a real Prometheus without an error.
    for expr in dashboard_exprs():
        answer = _query(api, expr.replace("$__rate_interval", "1m").replace("$instance", ".*"))
        assert answer["status"] == "success", (expr, answer)
    for rule in alerts():
        assert _query(api, rule["expr"])["status"] == "success", rule["expr"]

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in _get(f"{api}/api/v1/rules")["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = _wait("every rule evaluated", 15, evaluated)
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alerts()}
    assert all(rule["health"] == "ok" for rule in rules), [(rule["name"], rule.get("lastError")) for rule in rules]
    # A run that is up and stepping is neither down, absent, nor stuck.
    active = {alert["labels"]["alertname"] for alert in _get(f"{api}/api/v1/alerts")["data"]["alerts"]}
    assert not active & {"StreamsslTargetDown", "StreamsslTargetAbsent", "StreamsslNoSteps"}, active

    # The live exposition passes promtool's lint as well.
    text = urllib.request.urlopen(f"http://127.0.0.1:{training}/metrics", timeout=5).read().decode()
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30,
                          check=False)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
