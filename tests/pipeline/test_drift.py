"""Embedding drift (pipeline/drift.py): the AUC against its definition, the windows, and the measure on real images.

Real images are Fashion-MNIST; the switched distribution is the same images inverted (255 - x). The encoder is
the run's convnet, untrained and seeded (the drift measure must work from the first eval on), and, in the run
tests, the one a short real run trained.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from streamssl.models import build_backbone
from streamssl.pipeline.checkpointing import Checkpointer
from streamssl.pipeline.drift import DriftMonitor, domain_classifier_auc, roc_auc
from streamssl.pipeline.images import Trainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from tests.conftest import tiny_config

THRESHOLD = 0.55  # Evidently's default alarm, and the alert rule's
MEAN, STD = [0.286], [0.353]
CPU = torch.device("cpu")


def test_roc_auc_is_the_share_of_correctly_ordered_pairs_ties_counting_half() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 8, (60,), generator=generator).double()  # many ties
    labels = torch.randint(0, 2, (60,), generator=generator)
    positives, negatives = scores[labels == 1].tolist(), scores[labels == 0].tolist()
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives)]
    assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert roc_auc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0, 0, 1])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def test_domain_classifier_tells_shifted_rows_and_not_rows_of_one_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    reference, same = torch.randn(400, 32, generator=generator), torch.randn(400, 32, generator=generator)
    shifted = torch.randn(400, 32, generator=generator) + 0.3 * torch.ones(32)
    assert domain_classifier_auc(reference, same) < THRESHOLD
    assert domain_classifier_auc(reference, shifted) > 0.8  # the best possible: 0.885 (a 1.7 sigma mean shift)
    assert domain_classifier_auc(reference, same) == domain_classifier_auc(reference, same)  # seeded folds


def counting_batches(sizes: list[int]) -> list[torch.Tensor]:
    """Batches of 1x2x2 images whose pixels all hold the record's arrival number (mod 256)."""
    start, batches = 0, []
    for size in sizes:
        numbers = torch.arange(start, start + size) % 256
        batches.append(numbers.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).to(torch.uint8).clone())
        start += size
    return batches


def test_reference_keeps_the_first_records_and_the_ring_the_latest_through_a_restart() -> None:
    monitor = DriftMonitor(8, (1, 2, 2))
    for batch in counting_batches([5, 6]):
        monitor.observe(batch)
    assert monitor.reference[:, 0, 0, 0].tolist() == list(range(8)) and not monitor.ready
    state = monitor.state_dict()
    resumed = DriftMonitor(8, (1, 2, 2))
    resumed.load_state_dict(state)
    for batch in counting_batches([5, 6, 20])[2:]:  # the records after the checkpoint, a batch bigger than the ring
        monitor.observe(batch)
        resumed.observe(batch)
    assert monitor.ready and sorted(monitor.recent[:, 0, 0, 0].tolist()) == list(range(23, 31))
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(monitor.state_dict().values(), resumed.state_dict().values(), strict=True))
    other_shape = DriftMonitor(4, (1, 2, 2))
    other_shape.load_state_dict(state)  # drift.window changed: the windows fill again
    assert other_shape.reference_fill == other_shape.recent_seen == 0


@pytest.fixture(scope="module")
def fashion() -> torch.Tensor:
    images, _ = load_fashion_mnist("train")
    return torch.from_numpy(images[:6000]).unsqueeze(1)


def monitor_of(stream: torch.Tensor, window: int = 512) -> DriftMonitor:
    monitor = DriftMonitor(window, (1, 28, 28))
    for start in range(0, len(stream), 256):
        monitor.observe(stream[start:start + 256])
    return monitor


def test_drift_of_real_images_is_low_on_an_iid_stream_and_crosses_the_threshold_when_it_switches(
        fashion: torch.Tensor, one_thread: None) -> None:
    torch.manual_seed(0)
    encoder = build_backbone("convnet", 1)[0]
    iid = []
    for seed in range(2):  # two iid streams: low every time, not by luck of one draw
        stream = fashion[torch.randperm(len(fashion), generator=torch.Generator().manual_seed(seed))][:2048]
        iid.append(monitor_of(stream).measure(encoder, MEAN, STD, CPU))
    first = fashion[:1024]
    started = time.perf_counter()
    switched = monitor_of(torch.cat([first, 255 - fashion[1024:2048]])).measure(encoder, MEAN, STD, CPU)
    seconds = time.perf_counter() - started
    partly = fashion[1024:1536].clone()
    partly[:128] = 255 - partly[:128]  # a quarter of the recent window inverted
    quarter = monitor_of(torch.cat([first, partly])).measure(encoder, MEAN, STD, CPU)
    print(f"drift AUC: iid {[round(a, 3) for a in iid if a]}, a quarter inverted {quarter:.3f}, "
          f"all inverted {switched:.3f}; one measure of 2 x 512 records {seconds:.2f} s")
    assert all(auc is not None and auc < THRESHOLD for auc in iid), iid
    assert switched is not None and switched > 0.95
    assert quarter is not None and quarter > THRESHOLD


def test_a_run_reports_drift_after_its_stream_switches_and_keeps_its_windows_across_a_restart(
        tmp_path: Path, fashion: torch.Tensor, one_thread: None) -> None:
    plain = fashion[:768, 0].numpy()
    switching = tmp_path / "switching"
    build_lake(switching, np.concatenate([plain[:384], 255 - plain[384:]]), np.zeros(768, dtype=np.int64),
               shard_size=128)
    sets = ("data.mode=once", "data.shuffle_buffer=0", "drift.window=192", "checkpoint.every_steps=8")
    first = Trainer(tiny_config(tmp_path / "run", switching, *sets, "train.max_steps=8"))
    first.run()
    assert "drift_auc" not in first.state.eval_metrics  # 256 records: the recent window is not full yet
    found = Checkpointer(tmp_path / "run" / "checkpoints").load_latest()
    assert found is not None and found[0]["drift"]["reference_fill"] == 192
    assert found[0]["drift"]["recent_seen"] == 8 * 32 - 192

    resumed = Trainer(tiny_config(tmp_path / "run", switching, *sets))  # on to the end of the lake
    resumed.run()
    assert resumed.state.samples_seen == 768
    assert resumed.task.drift is not None and first.task.drift is not None
    assert torch.equal(resumed.task.drift.reference, first.task.drift.reference)  # the first 192, not re-taken
    switched = resumed.state.eval_metrics["drift_auc"]
    assert switched > THRESHOLD and resumed.metrics.embedding_drift._value.get() == switched

    # the same trained encoder on an iid stream of images that were not inverted: no alarm (windows of 512: at 256
    # one iid stream in six read 0.554, the noise of a small window)
    iid = monitor_of(fashion[:1024]).measure(resumed.task.encoder(), MEAN, STD, CPU)
    print(f"drift AUC after a short run: iid {iid:.3f}, switched {switched:.3f}")
    assert iid is not None and iid < THRESHOLD
