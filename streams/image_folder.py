"""A user's folder of images as a lake: `streamssl lake --from DIR --out LAKE`.

Every file under DIR (recursively, in sorted path order, hidden names skipped) ending in .jpg, .jpeg, .png or
.webp becomes one sample whose image member holds the file's bytes unchanged: nothing is re-encoded or
resized, the loader decodes it at full resolution. As torchvision's ImageFolder, DIR's immediate subfolders
are classes: a file anywhere under DIR/cat/ gets {"label": the index of "cat" among the sorted class names,
"class": "cat"} in its json member, which evaluation may read and training never does; a file directly in DIR
gets no label. The json also keeps the file's path relative to DIR. Other files are counted, not written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamssl.streams.lake import write_shard

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class ImageFolder:
    """The image files under a folder, in the order they are written, with their classes."""

    root: Path
    files: list[Path] = field(default_factory=list)  # relative to root
    skipped: int = 0  # files that are not JPEG/PNG/WebP by name
    classes: list[str] = field(default_factory=list)

    def labels(self) -> np.ndarray:
        """Each file's class index, -1 for a file directly in the root."""
        index = {name: number for number, name in enumerate(self.classes)}
        return np.array([index[file.parts[0]] if len(file.parts) > 1 else -1 for file in self.files], dtype=np.int64)


def scan_image_folder(root: Path) -> ImageFolder:
    folder = ImageFolder(Path(root))
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(directory, name).relative_to(root)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                folder.files.append(path)
            else:
                folder.skipped += 1
    folder.classes = sorted({file.parts[0] for file in folder.files if len(file.parts) > 1})
    return folder


def build_image_folder_lake(folder: ImageFolder, out_dir: Path, order: np.ndarray, *, shard_size: int = 1000,
                            key_prefix: str = "image") -> list[Path]:
    """Writes the files `order` picks (indices into `folder.files`) as shards of image + json samples.

    Keys are `{key_prefix}-{index:06d}`, the index into `folder.files` (a file's name may hold dots, which readers
    take for extensions). Returns the shard paths, in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = folder.labels()
    shards = []
    for number, start in enumerate(range(0, len(order), shard_size)):
        samples = (_sample(folder, int(index), int(labels[index]), key_prefix) for index in order[start:start + shard_size])
        shard = out_dir / f"shard-{number:06d}.tar"
        write_shard(shard, samples)
        shards.append(shard)
    return shards


def _sample(folder: ImageFolder, index: int, label: int, key_prefix: str) -> tuple[str, dict[str, bytes]]:
    file = folder.files[index]
    meta: dict[str, object] = {"path": file.as_posix(), "index": index}
    if label >= 0:
        meta.update(label=label, **{"class": folder.classes[label]})
    return (f"{key_prefix}-{index:06d}", {IMAGE_SUFFIXES[file.suffix.lower()]: (folder.root / file).read_bytes(),
                                          "json": json.dumps(meta).encode()})
