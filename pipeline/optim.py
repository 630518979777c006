"""Optimizers of a run: SGD, LARS or AdamW over the method's parameter groups.

Methods give parameter groups (`Method.param_groups`): weights, and 1-d parameters (BN, biases) that get
neither weight decay nor LARS's trust ratio, as the LARS (You et al. 2017), SimCLR, BYOL and SwAV recipes
do. A group with `fixed_lr` keeps the base LR through warm-up and decay (SimSiam's predictor).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARS's layer-wise trust ratio (You et al. 2017, as used by SimCLR and BYOL).

    For a parameter w with gradient g: u = g + wd·w, scaled by eta·||w|| / ||u|| (1 when either norm is 0),
    then v <- momentum·v + u and w <- w - lr·v. Groups with `lars_exclude` skip the trust ratio (and get
    their weight decay from the group, 0 for BN and biases).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update: Tensor = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad
                if not group["lars_exclude"]:
                    param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """`name` over `groups`; groups without their own weight_decay get `weight_decay`."""
    groups = [{"weight_decay": weight_decay, **group} for group in groups if group["params"]]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    plain = [{k: v for k, v in group.items() if k != "lars_exclude"} for group in groups]  # LARS's key only
    if name == "sgd":
        return torch.optim.SGD(plain, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(plain, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """This step's LR on every group; `fixed_lr` groups stay at the base LR (times their `lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = (base_lr if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)
