"""Batched per-sample augmentation: ours (pipeline/augment.py) vs kornia's, side by side on the same batch.

Both sides turn the same uint8 batch (default 256 Fashion-MNIST train images, 1x28x28; random pixels if
the dataset cannot be loaded) into 2 normalised views per step, as training does, with the same ops and
parameter ranges, those of `AugmentConfig`'s defaults (the blur's sigma range as `BatchAugment` scales it
to the image side, when it does):

* ours: `BatchAugment`, i.e. random resized crop + horizontal flip as one per-sample affine
  `grid_sample`, brightness/contrast jitter (saturation too for RGB), per-sample Gaussian blur.
* kornia (Riba et al. 2020, "Kornia: an Open Source Differentiable Computer Vision Library for
  PyTorch"): `RandomResizedCrop` (bilinear, align_corners=False like ours), `RandomHorizontalFlip`,
  `ColorJitter` in the fixed order brightness, contrast (saturation), `RandomGaussianBlur` with a
  per-sample sigma and our kernel size, `Normalize`; each draws parameters per sample.

Rounds alternate the two sides (the first side alternates too), each round times `--steps` steps of one
side, and the rate reported is the median over rounds of images/s (source images; each gives 2 views),
at the torch thread count as set. Before timing, both sides are checked: output shape, dtype and range;
per-sample randomness (copies of one image in one batch get different crops, flips, jitter and blur,
one op enabled at a time); and, with every op disabled, the normalised input back.

kornia is a bench-only dependency (checked with kornia 0.9.0).

    .venv/bin/python bench/augment_vs_kornia.py [--batch 256] [--rounds 7] [--steps 20] [--cropping-mode slice]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import time
from collections.abc import Callable

import kornia
import kornia.augmentation as K
import torch
from torch import Tensor, nn

from streamssl.pipeline.augment import BatchAugment, normalise
from streamssl.pipeline.config import AugmentConfig, DataConfig
from streamssl.streams.fashion_mnist import load_fashion_mnist

VIEWS = 2  # per step, as the two-view methods train
Augmenter = Callable[[Tensor], list[Tensor]]  # uint8 batch -> VIEWS normalised float views


def cpu_description() -> str:
    """lscpu's model name and the AVX-512 extensions the CPU has, and the kernels torch picked."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    avx512 = sorted(set(re.findall(r"\bavx512\w*", lscpu)))
    return (f"cpu: {model.group(1).strip() if model else 'unknown'}; "
            f"avx512: {'yes (' + ' '.join(avx512) + ')' if avx512 else 'no'}; "
            f"torch kernels: {torch.backends.cpu.get_cpu_capability()}")


def load_batch(batch: int) -> tuple[Tensor, str]:
    """`batch` uint8 images [B, 1, 28, 28] and where they came from."""
    try:
        images, _ = load_fashion_mnist("train")
        source = "Fashion-MNIST train"
    except Exception as error:  # no Debian files and no download: the timing does not depend on the content
        print(f"Fashion-MNIST unavailable ({error}); random pixels instead")
        images, source = None, "random pixels"
    generator = torch.Generator().manual_seed(0)
    if images is None:
        return torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=generator), source
    pick = torch.randperm(len(images), generator=generator)[:batch]
    return torch.from_numpy(images[pick.numpy()]).unsqueeze(1), source


def blur_kernel_size(size: int) -> int:
    """Side of pipeline/augment.py's blur kernel: radius ~10% of the image, as in SimCLR (at least 1)."""
    return 2 * max(1, size // 10) + 1


def ours(cfg: AugmentConfig, data: DataConfig, device: torch.device) -> Augmenter:
    """`BatchAugment` as the trainer uses it: one generator, on the batch's device, for all draws."""
    augment = BatchAugment(cfg, data.mean, data.std, data.size)
    generator = torch.Generator(device=device).manual_seed(0)
    return lambda images: augment(images, generator, VIEWS)


def blur_sigma(cfg: AugmentConfig, data: DataConfig) -> tuple[float, float]:
    """The sigma range `BatchAugment` actually blurs with: `AugmentConfig.blur_sigma`, times its `blur_scale`
    where it has one (the range is SimCLR's for 224 px images, scaled to the image side)."""
    scale = getattr(BatchAugment(cfg, data.mean, data.std, data.size), "blur_scale", 1.0)
    return cfg.blur_sigma[0] * scale, cfg.blur_sigma[-1] * scale


def theirs(cfg: AugmentConfig, data: DataConfig, cropping_mode: str) -> Augmenter:
    """kornia's augmentations set to the recipe of `cfg`; kornia draws from torch's default generator."""
    pipeline = nn.Sequential(
        K.RandomResizedCrop((data.size, data.size), scale=(cfg.crop_scale[0], cfg.crop_scale[-1]),
                            ratio=(cfg.crop_ratio[0], cfg.crop_ratio[-1]), resample="bilinear", align_corners=False,
                            cropping_mode=cropping_mode),
        K.RandomHorizontalFlip(p=cfg.flip_prob),
        # Our order: brightness, then contrast (then saturation); kornia's default would draw a random order.
        K.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast,
                      saturation=cfg.saturation if data.channels == 3 else 0.0, p=cfg.jitter_prob,
                      order=(0, 1, 2) if data.channels == 3 else (0, 1)),
        K.RandomGaussianBlur(blur_kernel_size(data.size), sigma=blur_sigma(cfg, data), border_type="reflect",
                             p=cfg.blur_prob),
        K.Normalize(mean=torch.tensor(data.mean), std=torch.tensor(data.std)),
    )

    def augment(images: Tensor) -> list[Tensor]:
        pixels = images.float() / 255.0  # once per step here, once per view in ours: a cheap op, kornia's favour
        return [pipeline(pixels) for _ in range(VIEWS)]

    return augment


# Every op off: a full-image crop at aspect 1, no flip, no jitter, no blur.
DISABLED = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_prob": 0.0, "jitter_prob": 0.0, "blur_prob": 0.0}
# One op at a time on top of DISABLED, at full probability, for the per-sample randomness check.
SINGLE_OPS = {
    "crop": {"crop_scale": AugmentConfig().crop_scale, "crop_ratio": AugmentConfig().crop_ratio},
    "flip": {"flip_prob": 0.5},
    "jitter": {"jitter_prob": 1.0},
    "blur": {"blur_prob": 1.0},
}


def check(name: str, make: Callable[[AugmentConfig], Augmenter], images: Tensor, data: DataConfig) -> bool:
    """Prints and returns whether one side passes the correctness checks."""
    passed = True

    def report(ok: bool, what: str) -> None:
        nonlocal passed
        passed &= ok
        print(f"  [{name}] {'ok  ' if ok else 'FAIL'} {what}")

    low = (0.0 - data.mean[0]) / data.std[0]
    high = (1.0 - data.mean[0]) / data.std[0]
    views = make(AugmentConfig())(images)
    out = views[0]
    report(len(views) == VIEWS and all(v.shape == (len(images), data.channels, data.size, data.size) for v in views),
           f"{len(views)} views of shape {tuple(out.shape)}")
    report(all(v.dtype == torch.float32 for v in views), f"dtype {out.dtype}")
    lowest, highest = min(float(v.min()) for v in views), max(float(v.max()) for v in views)
    report(all(bool(torch.isfinite(v).all()) for v in views) and low - 1e-4 <= lowest and highest <= high + 1e-4,
           f"range [{lowest:.3f}, {highest:.3f}] within the normalised [0, 1] = [{low:.3f}, {high:.3f}]")
    report(not torch.equal(views[0], views[1]), "the two views differ")

    # Copies of one image, one op enabled: a batch-wide draw would make every copy alike.
    source = images[:1].expand(len(images), -1, -1, -1).contiguous()
    for op, settings in SINGLE_OPS.items():
        copies = make(dataclasses.replace(AugmentConfig(), **{**DISABLED, **settings}))(source)[0]
        distinct = len(torch.unique(copies.flatten(1), dim=0))
        # A batch-wide draw gives 1 distinct output. A flip has 2 outcomes; a small drawn sigma blurs nothing
        # visible in float32, so blurred copies may agree too; two copies should always get different crops.
        ok = distinct == 2 if op == "flip" else distinct > 1
        first_two = ""
        if op == "crop":
            ok &= not torch.equal(copies[0], copies[1])
            first_two = f", the first two {'different' if ok else 'equal'}"
        report(ok, f"{op}: {distinct} distinct outputs from {len(images)} copies of one image{first_two}")

    identity = make(dataclasses.replace(AugmentConfig(), **DISABLED))(images)[0]
    error = float((identity - normalise(images, data.mean, data.std)).abs().max())
    report(error <= 1e-5, f"every op disabled: the normalised input, max |difference| {error:.2e}")
    return passed


def timed(augment: Augmenter, images: Tensor, steps: int) -> float:
    """Seconds for `steps` steps of `VIEWS` views of the batch."""
    synchronize = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        augment(images)
    synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per side, alternating the sides")
    parser.add_argument("--steps", type=int, default=20, help="steps (of 2 views each) per side per round")
    parser.add_argument("--cropping-mode", choices=("slice", "resample"), default="slice",
                        help="kornia's RandomResizedCrop: crop by indices then resize (its default), or one warp")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = DataConfig()
    images, source = load_batch(args.batch)
    images = images.to(device)
    print(cpu_description())
    print(f"torch {torch.__version__}, kornia {kornia.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"batch {args.batch} x {data.channels}x{data.size}x{data.size} uint8 ({source}), {VIEWS} views per step, "
          f"{args.steps} steps per round, {args.rounds} rounds; kornia cropping_mode={args.cropping_mode}")
    low, high = blur_sigma(AugmentConfig(), data)
    print(f"blur: kernel {blur_kernel_size(data.size)} px, sigma U({low:.4g}, {high:.4g}) on both sides")

    def make_ours(cfg: AugmentConfig) -> Augmenter:
        return ours(cfg, data, device)

    def make_theirs(cfg: AugmentConfig) -> Augmenter:
        return theirs(cfg, data, args.cropping_mode)

    torch.manual_seed(0)
    print("correctness:")
    passed = {"ours": check("ours", make_ours, images, data), "kornia": check("kornia", make_theirs, images, data)}

    sides = {"ours": make_ours(AugmentConfig()), "kornia": make_theirs(AugmentConfig())}
    for augment in sides.values():
        timed(augment, images, 1)  # warm-up: allocations, kernel selection
    rates: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            rates[name].append(args.batch * args.steps / timed(sides[name], images, args.steps))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{'side':<8} {'images/s (median)':>18}   rounds")
    for name in names:
        print(f"{name:<8} {median[name]:>18.0f}   {' '.join(f'{rate:.0f}' for rate in rates[name])}")
    verdicts = ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in passed.items())
    print(f"ratio ours/kornia: {median['ours'] / median['kornia']:.2f}x; checks: {verdicts}")


if __name__ == "__main__":
    main()
