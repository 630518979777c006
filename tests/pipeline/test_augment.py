"""Batched augmentation draws independent parameters per sample and is reproducible from its generator."""

from __future__ import annotations

import torch

from streamssl.pipeline.augment import BatchAugment, crop_flip_grids, gaussian_blur
from streamssl.pipeline.config import AugmentConfig


def _images(n: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)


def test_two_samples_of_one_batch_get_different_crops() -> None:
    grids = crop_flip_grids(16, 28, (0.2, 1.0), (0.75, 1.333), 0.5, torch.Generator().manual_seed(1), torch.device("cpu"))
    corners = grids[:, 0, 0, :]  # where each sample's top-left output pixel samples from
    assert len({tuple(c.tolist()) for c in corners}) == 16
    # Identical input images must come out different: the parameters are per sample, not per batch.
    same = _images(1).repeat(6, 1, 1, 1)
    views = BatchAugment(AugmentConfig(), [0.5], [0.25], 28).view(same, torch.Generator().manual_seed(2))
    flat = views.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 6))


def test_full_scale_no_flip_crop_is_the_identity() -> None:
    grids = crop_flip_grids(4, 28, (1.0, 1.0), (1.0, 1.0), 0.0, torch.Generator(), torch.device("cpu"))
    images = _images(4).float()
    out = torch.nn.functional.grid_sample(images, grids, align_corners=False)
    assert torch.allclose(out, images, atol=1e-3)


def test_flip_probability_one_mirrors_the_image() -> None:
    grids = crop_flip_grids(2, 28, (1.0, 1.0), (1.0, 1.0), 1.0, torch.Generator(), torch.device("cpu"))
    images = _images(2).float()
    out = torch.nn.functional.grid_sample(images, grids, align_corners=False)
    assert torch.allclose(out, images.flip(-1), atol=1e-3)


def test_blur_keeps_mean_and_smooths_only_where_drawn() -> None:
    images = torch.rand(4, 1, 28, 28)
    blurred = gaussian_blur(images, (1.5, 1.5), 1.0, torch.Generator())
    assert torch.allclose(blurred.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=0.02)
    assert (blurred.diff(dim=-1).abs().mean() < 0.6 * images.diff(dim=-1).abs().mean())
    untouched = gaussian_blur(images, (1.5, 1.5), 0.0, torch.Generator())
    assert torch.allclose(untouched, images, atol=1e-6)


def test_same_generator_state_gives_the_same_views() -> None:
    augment = BatchAugment(AugmentConfig(), [0.5], [0.25], 28)
    first = augment(_images(), torch.Generator().manual_seed(7))
    second = augment(_images(), torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])  # the two views of a batch differ
