"""MoCo v2, BYOL and SwAV training steps: ours vs lightly's implementation of the same method, side by side.

Both sides get the same backbone (our ConvNet, plain BN, identical initial weights), the same heads'
shapes, hyper-parameters, SGD optimizer and bf16 autocast (where the CPU has it), batch 256 of
Fashion-MNIST. Two comparisons per method, rounds alternating the two sides:

* `step`: the same pre-augmented views on both sides (SwAV: 2×28 px + 4×12 px crops), so the timed
  part is the method alone: forward, loss, backward, optimizer step, momentum updates, queue.
* `step+augment`: each side also makes its views from the decoded images the way the library does:
  ours with the batched per-sample augmentation of pipeline/augment.py on the uint8 batch, lightly
  with its transforms (MoCoV2Transform for MoCo and BYOL, SwaVTransform for SwAV) applied per PIL
  image and stacked, set to the same recipe (crop scale, flip, jitter, blur, crop sizes and counts).

lightly is a bench-only dependency (`requirements-bench.txt`).

    .venv/bin/python bench/vs_lightly.py [--steps 30] [--rounds 3] [--methods moco,byol,swav]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import MoCoV2Transform, SwaVTransform
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import Tensor, nn

from streamssl.models import build_backbone, build_method
from streamssl.pipeline.augment import BatchAugment
from streamssl.pipeline.config import AugmentConfig
from streamssl.pipeline.device import resolve_precision
from streamssl.streams.fashion_mnist import load_fashion_mnist

BATCH = 256
FEATURES = 256  # the ConvNet's width
OURS = {  # our options matching the lightly recipes below
    "moco": {"dim": 128, "queue_size": 4096, "momentum": 0.99, "temperature": 0.1, "mlp": True},
    "byol": {"projection_dim": 128, "hidden_dim": 512, "tau_base": 0.99},
    "swav": {"dim": 128, "num_prototypes": 300, "small_crops": 4, "small_crop_size": 12, "queue_size": 0,
             "freeze_prototypes_steps": 0},
}


class LightlyMoCo(nn.Module):
    """lightly's MoCo v2 recipe: momentum backbone + head, NTXentLoss with a 4096-key memory bank."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, MoCoProjectionHead(FEATURES, FEATURES, 128)
        self.backbone_m, self.head_m = copy.deepcopy(self.backbone), copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_m)
        deactivate_requires_grad(self.head_m)
        self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))

    def forward(self, views: list[Tensor], step: int) -> Tensor:
        update_momentum(self.backbone, self.backbone_m, m=0.99)
        update_momentum(self.head, self.head_m, m=0.99)
        query = self.head(self.backbone(views[0]))
        key = self.head_m(self.backbone_m(views[1])).detach()
        return self.criterion(query.float(), key.float())


class LightlyBYOL(nn.Module):
    """lightly's BYOL recipe: projection + prediction heads, EMA target on a cosine schedule."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = BYOLProjectionHead(FEATURES, 512, 128)
        self.prediction = BYOLPredictionHead(128, 512, 128)
        self.backbone_m, self.projection_m = copy.deepcopy(self.backbone), copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_m)
        deactivate_requires_grad(self.projection_m)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, views: list[Tensor], step: int) -> Tensor:
        momentum = cosine_schedule(step, 10000, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_m, m=momentum)
        update_momentum(self.projection, self.projection_m, m=momentum)
        p0, p1 = (self.prediction(self.projection(self.backbone(x))) for x in views[:2])
        z0, z1 = (self.projection_m(self.backbone_m(x)).detach() for x in views[:2])
        return 0.5 * (self.criterion(p0.float(), z1.float()) + self.criterion(p1.float(), z0.float()))


class LightlySwAV(nn.Module):
    """lightly's SwAV recipe: projection head, prototypes normalised each step, multi-crop SwaVLoss."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = SwaVProjectionHead(FEATURES, FEATURES, 128)
        self.prototypes = SwaVPrototypes(128, 300, n_steps_frozen_prototypes=0)
        self.criterion = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)

    def forward(self, views: list[Tensor], step: int) -> Tensor:
        self.prototypes.normalize()
        outputs = [self.prototypes(nn.functional.normalize(self.projection(self.backbone(x)), dim=1), step).float()
                   for x in views]
        return self.criterion(outputs[:2], outputs[2:])


LIGHTLY: dict[str, Callable[[nn.Module], nn.Module]] = {"moco": LightlyMoCo, "byol": LightlyBYOL, "swav": LightlySwAV}


def lightly_transform(method: str) -> Callable[[Image.Image], list[Tensor]]:
    """lightly's transform set to our default recipe (AugmentConfig, SwAV's crops), for 1-channel images."""
    common = {"cj_prob": 0.8, "cj_bright": 0.4, "cj_contrast": 0.4, "cj_sat": 0.4, "cj_hue": 0.0,
              "random_gray_scale": 0.0, "gaussian_blur": 0.5, "sigmas": (0.1, 2.0), "hf_prob": 0.5,
              "normalize": {"mean": [0.286], "std": [0.353]}}
    if method == "swav":
        return SwaVTransform(crop_sizes=(28, 12), crop_counts=(2, 4), crop_min_scales=(0.2, 0.05),
                             crop_max_scales=(1.0, 0.4), **common)
    return MoCoV2Transform(input_size=28, min_scale=0.2, **common)


class ViewMaker:
    """Views of batch i for one side: pre-augmented, or augmented inside the timed step."""

    def __init__(self, method: str, batches: int, side: str, with_augment: bool) -> None:
        images, _ = load_fashion_mnist("train")
        self.pixels = [torch.from_numpy(images[i * BATCH:(i + 1) * BATCH]).unsqueeze(1) for i in range(batches)]
        self.pil = [[Image.fromarray(image) for image in images[i * BATCH:(i + 1) * BATCH]] for i in range(batches)]
        self.small = OURS[method].get("small_crops", 0)
        self.augment = BatchAugment(AugmentConfig(), [0.286], [0.353], 28)
        self.transform = lightly_transform(method)
        self.gen = torch.Generator().manual_seed(0)
        self.side, self.with_augment = side, with_augment
        self.fixed = [self.ours(i) for i in range(batches)]

    def ours(self, i: int) -> list[Tensor]:
        views = self.augment(self.pixels[i], self.gen, 2, self.small, 12, (0.05, 0.4))
        return [v.contiguous(memory_format=torch.channels_last) for v in views]

    def lightly(self, i: int) -> list[Tensor]:
        per_image = [self.transform(image) for image in self.pil[i]]
        return [torch.stack([views[v] for views in per_image]).contiguous(memory_format=torch.channels_last)
                for v in range(len(per_image[0]))]

    def __call__(self, step: int) -> list[Tensor]:
        i = step % len(self.fixed)
        if not self.with_augment:
            return self.fixed[i]
        return self.ours(i) if self.side == "ours" else self.lightly(i)


def timed_steps(step_fn: Callable[[list[Tensor], int], Tensor], views: ViewMaker, optimizer: torch.optim.Optimizer,
                steps: int, start: int, autocast: bool, after_step: Callable[[int], None]) -> float:
    """Seconds for `steps` full training steps."""
    began = time.perf_counter()
    for step in range(start, start + steps):
        batch_views = views(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = step_fn(batch_views, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_step(step)
    return time.perf_counter() - began


def compare(method: str, steps: int, rounds: int, autocast: bool, with_augment: bool) -> dict[str, float | str]:
    torch.manual_seed(0)
    backbone, _ = build_backbone("convnet", 1, bn_splits=1)
    ours = build_method(method, copy.deepcopy(backbone), FEATURES, OURS[method]).to(memory_format=torch.channels_last)
    theirs = LIGHTLY[method](copy.deepcopy(backbone)).to(memory_format=torch.channels_last)
    sides = {
        "ours": (ours, lambda views, step: ours(views)[0], ours.on_step_end),
        "lightly": (theirs, theirs.forward, lambda step: None),
    }
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
                  for name, (model, _, _) in sides.items()}
    view_makers = {name: ViewMaker(method, 4, name, with_augment) for name in sides}
    seconds = dict.fromkeys(sides, 0.0)
    done = dict.fromkeys(sides, 0)
    for round_index in range(rounds + 1):  # round 0 warms up both sides and is not counted
        for name, (_, step_fn, after_step) in sides.items():
            elapsed = timed_steps(step_fn, view_makers[name], optimizers[name], steps, done[name], autocast, after_step)
            done[name] += steps
            if round_index:
                seconds[name] += elapsed
    rate = {name: steps * rounds * BATCH / seconds[name] for name in sides}
    return {"method": method, "timed": "step+augment" if with_augment else "step",
            "ours_samples_per_s": round(rate["ours"], 1), "lightly_samples_per_s": round(rate["lightly"], 1),
            "ratio": round(rate["ours"] / rate["lightly"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="moco,byol,swav")
    args = parser.parse_args()
    autocast = resolve_precision("auto", torch.device("cpu")) == "bf16"
    print(json.dumps({"batch": BATCH, "autocast_bf16": autocast, "threads": torch.get_num_threads()}), flush=True)
    for method in args.methods.split(","):
        for with_augment in (False, True):
            print(json.dumps(compare(method, args.steps, args.rounds, autocast, with_augment)), flush=True)


if __name__ == "__main__":
    main()
