"""Batched augmentation with independent random parameters for every sample.

A torchvision v2 transform applied to a batch tensor draws one set of parameters for the whole
batch; SSL needs each sample to get its own crop, flip, jitter and blur. Here every parameter is
drawn as a [B]-shaped tensor and applied in one batched op: crops and flips as one per-sample
affine `grid_sample`, jitter as per-sample factors broadcast over the image, blur as a grouped
convolution with one kernel per sample. All draws come from one `torch.Generator`, whose state
goes into the checkpoint, so a resumed run sees the same views.

A batch of images of different sizes (decoded at their own aspect ratio, padded to one canvas) comes with
`extents`, each image's height and width: its crop is drawn relative to the image itself (area share and
aspect ratio in pixels, as torchvision's RandomResizedCrop) and placed inside it, so nothing is squashed or
padding sampled. The draws are the same in number and order, so a batch of equal squares (`extents` None)
gets exactly the crops it got before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from streamssl.pipeline.config import AugmentConfig


def _uniform(low: float, high: float, n: int, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _coin(prob: float, n: int, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) < prob


def crop_flip_grids(n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                    flip_prob: float, gen: torch.Generator, device: torch.device, extents: Tensor | None = None,
                    canvas: tuple[int, int] = (1, 1)) -> Tensor:
    """Sampling grids for per-sample random-resized crops (with horizontal flips), [N,H,W,2].

    Area fraction s ~ U(scale), log aspect ratio ~ U(log ratio): the crop is w = sqrt(s·r),
    h = sqrt(s/r) of the image (clipped to 1), centred uniformly where it fits. With `extents` (each image's
    [height, width] at the top left of a `canvas` of height x width pixels) the image's own aspect a = h/w
    enters, w = sqrt(s·r·a), h = sqrt(s/(r·a)), and the crop is then mapped into the image's part of the canvas.
    """
    area = _uniform(scale[0], scale[1], n, gen, device)
    log_ratio = _uniform(math.log(ratio[0]), math.log(ratio[1]), n, gen, device)
    aspect = torch.exp(log_ratio)
    if extents is not None:
        heights, widths = extents[:, 0].to(device, torch.float32), extents[:, 1].to(device, torch.float32)
        aspect = aspect * (heights / widths)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    # affine_grid works in [-1, 1] coordinates: a crop of relative size w can move by ±(1 - w).
    centre_x = _uniform(-1.0, 1.0, n, gen, device) * (1 - width)
    centre_y = _uniform(-1.0, 1.0, n, gen, device) * (1 - height)
    flip = torch.where(_coin(flip_prob, n, gen, device), -1.0, 1.0)
    if extents is not None:  # the image spans [-1, -1 + 2·share] of the canvas on each axis
        share_x, share_y = widths / canvas[1], heights / canvas[0]
        width, centre_x = width * share_x, (centre_x + 1) * share_x - 1
        height, centre_y = height * share_y, (centre_y + 1) * share_y - 1
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return F.affine_grid(theta, [n, 1, size, size], align_corners=False)


def colour_jitter(images: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Per-sample brightness, contrast (and saturation for RGB) factors, applied with prob jitter_prob."""
    n, channels = images.shape[:2]
    device = images.device
    apply = _coin(cfg.jitter_prob, n, gen, device)

    def factors(strength: float) -> Tensor:
        drawn = _uniform(1 - strength, 1 + strength, n, gen, device)
        return torch.where(apply, drawn, torch.ones_like(drawn)).view(n, 1, 1, 1)

    images = images * factors(cfg.brightness)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * factors(cfg.contrast) + mean
    if channels == 3:
        grey = (images * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        images = (images - grey) * factors(cfg.saturation) + grey
    return images.clamp(0.0, 1.0)


def gaussian_blur(images: Tensor, sigma_range: tuple[float, float], prob: float, gen: torch.Generator) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma; samples not drawn keep a delta kernel."""
    n, channels, height, width = images.shape
    device = images.device
    sigma = _uniform(sigma_range[0], sigma_range[1], n, gen, device)
    apply = _coin(prob, n, gen, device)
    radius = max(1, min(height, width) // 10)  # ~10% of the image, as SimCLR's kernel size
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(images.dtype).expand_as(kernel)
    kernel = torch.where(apply.view(-1, 1), kernel, delta)
    # One group per (sample, channel): each sample is convolved with its own kernel.
    weight = kernel.repeat_interleave(channels, dim=0)
    flat = images.reshape(1, n * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, weight.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, weight.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


class BatchAugment:
    """Turns a uint8 batch [B,C,H,W] into normalised float views, each sample augmented independently."""

    def __init__(self, cfg: AugmentConfig, mean: list[float], std: list[float], size: int) -> None:
        self.cfg = cfg
        self.size = size
        self.blur_scale = size / 224  # blur_sigma is SimCLR's range for 224 px images (see AugmentConfig)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def view(self, images: Tensor, gen: torch.Generator, size: int | None = None,
             scale: tuple[float, float] | None = None, extents: Tensor | None = None) -> Tensor:
        """One augmented view of every image (uint8, or float in [0, 1]); `size`/`scale` override the crop's
        output side and area range; `extents` as in `crop_flip_grids`."""
        cfg = self.cfg
        pixels = images if images.is_floating_point() else images.float() / 255.0
        grids = crop_flip_grids(
            pixels.shape[0], size or self.size, scale or (cfg.crop_scale[0], cfg.crop_scale[-1]),
            (cfg.crop_ratio[0], cfg.crop_ratio[-1]), cfg.flip_prob, gen, pixels.device, extents,
            (pixels.shape[2], pixels.shape[3]),
        )
        pixels = F.grid_sample(pixels, grids, mode="bilinear", padding_mode="reflection", align_corners=False)
        pixels = colour_jitter(pixels, cfg, gen)
        pixels = gaussian_blur(pixels, (cfg.blur_sigma[0] * self.blur_scale, cfg.blur_sigma[-1] * self.blur_scale),
                               cfg.blur_prob, gen)
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def __call__(self, images: Tensor, gen: torch.Generator, views: int = 2, small_crops: int = 0,
                 small_size: int = 0, small_scale: tuple[float, float] = (0.05, 0.4),
                 extents: Tensor | None = None) -> list[Tensor]:
        """`views` full-size views, then `small_crops` multi-crop views of side `small_size` (SwAV)."""
        pixels = images.float() / 255.0  # once for all views: a full-resolution canvas is large
        full = [self.view(pixels, gen, extents=extents) for _ in range(views)]
        return full + [self.view(pixels, gen, small_size, small_scale, extents) for _ in range(small_crops)]


def normalise(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [B,C,H,W] → normalised float, no augmentation (evaluation)."""
    device = images.device
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
