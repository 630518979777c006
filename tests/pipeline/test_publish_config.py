"""The `publish` section: every key shown with its help, bad values refused as one ConfigError line."""

from __future__ import annotations

import pytest

from streamssl.pipeline.config import ConfigError, load_config
from streamssl.pipeline.config_show import describe


@pytest.mark.parametrize(("setting", "message"), [
    ("publish.keep=-1", "publish.keep must be >= 0"),
    ("publish.tolerance=-0.1", "publish.tolerance must be >= 0"),
    ("publish.keep_candidates=-2", "publish.keep_candidates must be >= 0"),
    ("publish.webhook=ftp://example.org/hook", "publish.webhook must be an http:// or https:// URL with a host"),
    ("publish.webhook=http:///no-host", "publish.webhook must be an http:// or https:// URL with a host"),
    ("publish.webhook=http://example.org/a b", "publish.webhook must be an http:// or https:// URL with a host"),
    ("publish.topic=events", "publish.topic needs Kafka servers: set publish.bootstrap"),
    ("publish.bootstrap=127.0.0.1:9092", "publish.bootstrap is set but publish.topic is not"),
    ("publish.timeout_seconds=0", "publish.timeout_seconds must be > 0"),
])
def test_a_bad_publish_setting_is_one_config_error(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        load_config(sets=["method=simclr", setting])
    assert "\n" not in str(caught.value)


def test_a_bad_topic_or_bootstrap_is_refused_and_a_kafka_source_lends_its_servers() -> None:
    with pytest.raises(ConfigError, match=r"publish.topic / publish.bootstrap: .*topic name"):
        load_config(sets=["publish.topic=bad topic!", "publish.bootstrap=127.0.0.1:9092"])
    with pytest.raises(ConfigError, match="malformed HOST:PORT"):
        load_config(sets=["publish.topic=events", "publish.bootstrap=nohostport"])
    cfg = load_config(sets=["data.source=kafka://127.0.0.1:9092/images", "publish.topic=events"])
    assert cfg.publish.topic == "events"


@pytest.mark.parametrize("job", ["images", "series", "forecast"])
def test_every_job_shows_the_publish_keys_with_their_help(job: str) -> None:
    method = {"images": "moco", "series": "cpc", "forecast": "forecast"}[job]
    lines = [line for line in describe(method, job) if line.startswith("publish.")]  # type: ignore[arg-type]
    keys = {line.split()[0] for line in lines}
    assert {"publish.gate", "publish.tolerance", "publish.keep", "publish.keep_every", "publish.topic",
            "publish.bootstrap", "publish.webhook"} <= keys
    assert all("#" in line for line in lines)


def test_the_webhook_url_is_kept_out_of_what_is_written() -> None:
    from streamssl.pipeline.config import redacted

    cfg = load_config(sets=["publish.webhook=https://hooks.example.org/T0KEN"])
    assert redacted(cfg)["publish"]["webhook"] == "" and cfg.publish.webhook.endswith("T0KEN")
