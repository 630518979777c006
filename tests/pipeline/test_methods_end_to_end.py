"""Every registered method (and a method with pretext heads) through the real trainer on a real lake:
resume is bit-exact including the method's own state, the published encoder loads and embeds, and
the method's logs reach the Prometheus registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from streamssl.models import load_encoder
from streamssl.models.registry import METHODS
from streamssl.pipeline.images import Trainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from tests.conftest import tiny_config
from tests.pipeline.test_resume import RecordingTrainer

pytestmark = pytest.mark.slow  # minutes on 2 cores: `pytest -m 'not slow'` skips it in an inner loop

STEPS = 8
# Small enough that every piece of method state moves within 8 steps of batch 32 on a 128-image lake,
# where records repeat (NPID bank hits, DeepCluster reclustering, SwAV queue in use, BYOL tau moving).
METHOD_SETS: dict[str, list[str]] = {
    "moco": [],
    "swav": ["swav.queue_size=64", "swav.queue_start_step=1", "swav.freeze_prototypes_steps=2",
             "swav.num_prototypes=16", "swav.small_crops=2"],
    "byol": [],  # tau follows the 8-step horizon
    "simclr": [],
    "simsiam": [],
    "deepcluster": ["deepcluster.num_clusters=4", "deepcluster.buffer_size=64", "deepcluster.recluster_every=3"],
    "npid": ["npid.bank_size=256", "npid.negatives=32"],
    "rotation": [],
    "jigsaw": ["jigsaw.num_permutations=10"],
}
# One log per method that proves its own machinery ran and reached the Prometheus registry.
EXPECTED_STAT = {
    "moco": "positive_similarity", "swav": "loss_over_ln_k", "byol": "tau", "simclr": "positive_similarity",
    "simsiam": "prediction_target_cosine", "deepcluster": "nmi", "npid": "bank_hit_ratio",
    "rotation": "rotation_accuracy", "jigsaw": "jigsaw_accuracy", "moco+aux": "aux_rotation_loss",
    "moco-v1": "positive_similarity",
}
CASES = [(name, [f"method={name}", *sets]) for name, sets in METHOD_SETS.items()]


def _as_sets(tree: dict, prefix: str = "") -> list[str]:
    """A YAML config as `key=value` overrides (same keys, dotted)."""
    return [item for key, value in tree.items()
            for item in (_as_sets(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"])]


V1_CONFIG = Path(__file__).parents[2] / "deploy" / "configs" / "moco_v1.yaml"
CASES.append(("moco-v1", _as_sets(yaml.safe_load(V1_CONFIG.read_text()))))
CASES.append(("moco+aux", ["method=moco", "aux.rotation=0.5", "aux.jigsaw=0.2"]))


@pytest.fixture(scope="module")
def repeating_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = load_fashion_mnist("train")
    lake = tmp_path_factory.mktemp("repeating-lake")
    build_lake(lake, images[:128], labels[:128], shard_size=64)
    return lake


def test_every_registered_method_is_covered() -> None:
    assert sorted(METHOD_SETS) == sorted(METHODS)


def _train(run_dir: Path, lake: Path, sets: list[str], stop_after: int = 0) -> RecordingTrainer:
    cfg = tiny_config(run_dir, lake, f"train.max_steps={STEPS}", *sets)
    trainer = RecordingTrainer(cfg, stop_after=stop_after)
    trainer.run()
    return trainer


@pytest.mark.parametrize(("case", "sets"), CASES, ids=[case for case, _ in CASES])
def test_method_resumes_exactly_and_publishes(case: str, sets: list[str], tmp_path: Path,
                                              repeating_lake: Path) -> None:
    straight = _train(tmp_path / "straight", repeating_lake, sets)
    _train(tmp_path / "split", repeating_lake, sets, stop_after=STEPS // 2)
    resumed = _train(tmp_path / "split", repeating_lake, sets)

    assert straight.state.step == resumed.state.step == STEPS
    expected, actual = straight.method.state_dict(), resumed.method.state_dict()
    assert expected.keys() == actual.keys()
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []
    # Training really changed the model (not a comparison of two untouched ones).
    fresh_trainer = Trainer(tiny_config(tmp_path / "fresh", repeating_lake, *sets))
    fresh = fresh_trainer.method.state_dict()
    if case == "moco-v1":
        assert isinstance(fresh_trainer.method.head, torch.nn.Linear) and fresh_trainer.cfg.augment.blur_prob == 0
    assert any(not torch.equal(fresh[name], expected[name]) for name in expected if expected[name].is_floating_point())

    encoder = load_encoder(tmp_path / "split" / "published" / "latest")
    assert encoder.manifest["method"] == sets[0].split("=")[1] and encoder.manifest["step"] == STEPS
    pixels = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        embeddings = encoder.eval()(pixels)
        trained = resumed.method.encoder().eval()((pixels - 0.286) / 0.353)
    assert embeddings.shape == (3, straight.task.feature_dim) and torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings, trained)  # the published weights are the trained backbone

    exported = {sample.labels["stat"] for metric in resumed.metrics.registry.collect()
                if metric.name == "streamssl_method_stat" for sample in metric.samples}
    assert EXPECTED_STAT[case] in exported
    assert resumed.metrics.embedding_std._value.get() > 0
