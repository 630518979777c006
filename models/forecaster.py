"""Self-boosted forecaster: one shared trunk, a main head for the series, auxiliary heads for its components.

Nguyen et al. 2019, "Self-boosted Time-series Forecasting with Multi-task and Multi-view Learning"
(arXiv:1909.08181): a series is decomposed (EEMD); components closely related to the series become
auxiliary forecasting targets (multi-task learning, MTL) and loosely related ones become extra input
channels (multi-view learning, MTV). The modes compared in the paper, all with the same trunk:

* `persistence`: no parameters, forecasts the last observed value x[t] (the naive baseline).
* `single`: raw lags in, the main head only.
* `mtl`: raw lags in, main head + one head per auxiliary component.
* `mtv`: raw lags + view components in, main head only.
* `combined`: both (the paper's self-boosted model).

Inputs are [B, C, L]: channel 0 holds the last L values of the (normalised) series, channels 1.. the
view components; targets are [B, 1 + n_aux]: the main target first, then the auxiliary ones. Which
components are which is decided outside (on training data only); this module only sees tensors.

With `predict_change` (default) the main head forecasts the change from the last observed value,
x[t+h] - x[t], and adds x[t] back: the trunk then starts from persistence instead of from a constant,
which matters on near-random-walk series (exchange rates) where persistence is hard to beat. The
auxiliary heads forecast their components directly (a component has no "last value" in the inputs
unless it is also a view). The loss is MSE(main) + aux_weight * mean over aux targets of MSE(aux).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mode = Literal["persistence", "single", "mtl", "mtv", "combined"]
Trunk = Literal["cnn", "lstm"]
MODES: tuple[str, ...] = get_args(Mode)
TRUNKS: tuple[str, ...] = get_args(Trunk)


class ConvTrunk(nn.Module):
    """Two same-padded Conv1d(kernel 3) + ReLU layers over the lags, then a linear layer: [B, C, L] -> [B, hidden]."""

    def __init__(self, in_channels: int, lag: int, hidden: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(in_channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, padding=1), nn.ReLU(),
        )
        # flattening keeps the position of each lag (pooling would forget which value is the latest)
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(hidden * lag, hidden), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.convs(x))


class LSTMTrunk(nn.Module):
    """One LSTM layer over the lags; its last hidden state: [B, C, L] -> [B, hidden]."""

    def __init__(self, in_channels: int, lag: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_channels, hidden, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        _, (last_hidden, _) = self.lstm(x.transpose(1, 2))
        return last_hidden[-1]


def build_trunk(name: str, in_channels: int, lag: int, hidden: int) -> nn.Module:
    """The shared trunk by name ("cnn" | "lstm"): windows [B, in_channels, lag] -> features [B, hidden]."""
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk '{name}'; valid: {', '.join(TRUNKS)}")
    return (ConvTrunk if name == "cnn" else LSTMTrunk)(in_channels, lag, hidden)


class Forecaster(nn.Module):
    """Shared trunk + linear heads (main first, then one per auxiliary component).

    Args:
        in_channels: 1 (raw series) for persistence/single/mtl; 1 + number of view components for mtv/combined.
        lag: number of past points per input window (L).
        n_aux: auxiliary targets; 0 for persistence/single/mtv.
        mode: persistence | single | mtl | mtv | combined.
        hidden: trunk width.
        trunk: cnn | lstm.
        aux_weight: weight of the mean auxiliary MSE in the loss.
        predict_change: the main head forecasts x[t+h] - x[t] (see the module docstring).
    """

    def __init__(self, in_channels: int, lag: int, n_aux: int, *, mode: Mode = "combined", hidden: int = 64,
                 trunk: Trunk = "cnn", aux_weight: float = 1.0, predict_change: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown forecast mode '{mode}'; valid: {', '.join(MODES)}")
        if lag < 1 or in_channels < 1 or n_aux < 0 or hidden < 1 or aux_weight < 0:
            raise ValueError(f"Forecaster: need lag, in_channels, hidden >= 1 and n_aux, aux_weight >= 0; got lag={lag}, "
                             f"in_channels={in_channels}, n_aux={n_aux}, hidden={hidden}, aux_weight={aux_weight}")
        if mode in ("persistence", "single", "mtl") and in_channels != 1:
            raise ValueError(f"mode '{mode}' reads the raw series only (in_channels 1), got in_channels={in_channels}")
        if mode in ("persistence", "single", "mtv") and n_aux:
            raise ValueError(f"mode '{mode}' has no auxiliary targets, got n_aux={n_aux}")
        self.mode, self.lag, self.in_channels, self.n_aux = mode, lag, in_channels, n_aux
        self.aux_weight, self.predict_change = aux_weight, predict_change
        self.trunk: nn.Module | None = None
        self.heads: nn.Linear | None = None
        if mode != "persistence":
            self.trunk = build_trunk(trunk, in_channels, lag, hidden)
            # one linear head per target, stored as the rows of one Linear (identical maths, one matmul)
            self.heads = nn.Linear(hidden, 1 + n_aux)

    def outputs(self, inputs: Tensor) -> Tensor:
        """All forecasts [B, 1 + n_aux]: the main one (in the series' units) first, then the auxiliary ones."""
        if inputs.ndim != 3 or inputs.shape[1] != self.in_channels or inputs.shape[2] != self.lag:
            raise ValueError(f"Forecaster expects inputs [B, {self.in_channels}, {self.lag}], got {list(inputs.shape)}")
        last = inputs[:, 0, -1]
        if self.trunk is None or self.heads is None:  # persistence builds neither: the forecast is x[t]
            return last.unsqueeze(1)
        out = self.heads(self.trunk(inputs))
        if self.predict_change:
            out = torch.cat([out[:, :1] + last.unsqueeze(1), out[:, 1:]], dim=1)
        return out

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss (scalar) and detached logs for a batch: inputs [B, C, L], targets [B, 1 + n_aux]."""
        out = self.outputs(inputs).float()
        targets = targets.float()
        main = F.mse_loss(out[:, 0], targets[:, 0])
        logs = {"main_mse": main.detach()}
        loss = main
        if self.n_aux:
            aux = F.mse_loss(out[:, 1:], targets[:, 1:])  # mean over targets and samples: the mean of per-head MSEs
            loss = main + self.aux_weight * aux
            logs["aux_mse"] = aux.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def predict(self, inputs: Tensor) -> Tensor:
        """Main forecasts [B]."""
        return self.outputs(inputs)[:, 0]

    def encoder(self) -> nn.Module:
        """The shared trunk, the part that gets published (persistence has none: an empty module)."""
        return self.trunk if self.trunk is not None else nn.Identity()
