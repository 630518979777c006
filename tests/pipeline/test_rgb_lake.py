"""A user's own folder of mixed-size RGB JPEGs: `streamssl lake --from DIR` writes it unchanged, and a run at
data.size=64, channels=3 random-resized-crops from each decoded image, resumes exactly and publishes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from streamssl.models import load_encoder
from streamssl.pipeline.cli import main
from streamssl.pipeline.loading.messages import Batch
from tests.conftest import tiny_config
from tests.pipeline.test_resume import RecordingTrainer

# (width, height): 100-600 px, square, landscape, portrait, panorama
SIZES = [(100, 100), (600, 400), (300, 450), (480, 270), (200, 600), (512, 512), (160, 120), (600, 200)]
RGB = ["data.channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.size=64",
       "data.image_field=jpg", "train.batch_size=8", "model.bn_splits=2", "moco.queue_size=16", "data.shuffle_buffer=8"]


def make_photo_folder(root: Path, count: int = 24, seed: int = 0) -> Path:
    """JPEGs of the sizes above in two class folders (one nested deeper), plus a stray text file."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
        colour = rng.uniform(0.2, 1.0, 3)
        pixels = np.stack([np.sin(x * 6 + c * 9) * 0.5 + 0.5 for c in colour], -1) * (y[..., None] * 0.5 + 0.5)
        folder = root / ("cats" if index % 2 else "dogs") / ("deep" if index % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"photo.{index:03d}.jpg", quality=90)
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def photo_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    photos = make_photo_folder(tmp_path_factory.mktemp("photos"))
    lake = tmp_path_factory.mktemp("photo-lake")
    assert main(["lake", "--from", str(photos), "--out", str(lake), "--shard-size", "10"]) == 0
    return photos, lake


def test_lake_from_an_image_folder_writes_every_file_unchanged_with_its_class(photo_lake: tuple[Path, Path]) -> None:
    photos, lake = photo_lake
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(lake.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                handle = tar.extractfile(member)
                assert handle is not None
                samples.setdefault(key, {})[extension] = handle.read()
    assert len(list(lake.glob("*.tar"))) == 3 and len(samples) == 24
    for fields in samples.values():
        meta = json.loads(fields["json"])
        assert fields["jpg"] == (photos / meta["path"]).read_bytes()  # the bytes as they were: nothing re-encoded
        assert meta["class"] == Path(meta["path"]).parts[0] and meta["label"] == ["cats", "dogs"].index(meta["class"])


def test_an_image_folder_with_no_images_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("no pictures here")
    assert main(["lake", "--from", str(tmp_path), "--out", str(tmp_path / "lake")]) == 2
    assert capsys.readouterr().err.strip() == f"streamssl: error: no .jpg/.jpeg/.png/.webp images under {tmp_path}"


class ExtentTrainer(RecordingTrainer):
    """Also records whether each batch came padded, with its images' extents."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.padded: list[bool] = []
        step = self.task.step

        def recording_step(batch: Batch):
            self.padded.append(batch.extents is not None)
            return step(batch)

        self.task.step = recording_step


def _train(run_dir: Path, lake: Path, stop_after: int = 0) -> ExtentTrainer:
    trainer = ExtentTrainer(tiny_config(run_dir, lake, "train.max_steps=2", *RGB), stop_after=stop_after)
    trainer.run()
    return trainer


def test_an_rgb_jpeg_lake_trains_from_full_resolution_and_publishes(tmp_path: Path, photo_lake: tuple[Path, Path],
                                                                     one_thread: None) -> None:
    photos, lake = photo_lake
    trainer = _train(tmp_path / "run", lake)
    assert all(trainer.padded) and len(trainer.padded) == 2  # mixed sizes: every batch padded, cropped per image
    dead_letters = tmp_path / "run" / "dead-letter.jsonl"
    assert not dead_letters.exists() or dead_letters.read_text() == ""  # every photo decoded

    encoder = load_encoder(tmp_path / "run" / "published" / "latest")
    assert (encoder.manifest["input"]["channels"], encoder.manifest["input"]["height"]) == (3, 64)
    photo = Image.open(photos / "cats" / "photo.001.jpg").resize((64, 64))
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        embedding = encoder(pixels)
        expected = trainer.method.encoder().eval()((pixels - 0.5) / 0.25)
    torch.testing.assert_close(embedding, expected)


@pytest.mark.slow  # three runs: ~35 s on 2 busy cores
def test_a_full_resolution_run_resumes_exactly(tmp_path: Path, photo_lake: tuple[Path, Path], one_thread: None) -> None:
    _, lake = photo_lake
    straight = _train(tmp_path / "straight", lake)
    _train(tmp_path / "split", lake, stop_after=1)
    resumed = _train(tmp_path / "split", lake)
    assert resumed.keys == straight.keys[len(straight.keys) - len(resumed.keys):]
    expected, actual = straight.method.state_dict(), resumed.method.state_dict()
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []
