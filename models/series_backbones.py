"""Time-series encoders: windows of values [B, C, T] to per-step latents, and pooled features for consumers.

`build_series_encoder(name, channels)` returns (module, feature_dim). The module's `forward` gives latents
[B, feature_dim, T'] — what CPC's context network and prediction heads work on — and its `pooled(x)`
gives [B, feature_dim], the mean of those latents over time, which is what a downstream consumer uses
(`PooledSeriesEncoder` wraps an encoder into a module whose forward is `pooled`).

One choice, "conv": `layers` blocks of Conv1d (kernel 2*downsample+1, stride downsample, padding
downsample) -> LayerNorm over channels at each time step -> ReLU, except that the last block has no ReLU:
CPC compares latents by cosine, and ReLU latents all live in the positive orthant (measured on sine
windows, batch 32: CPC accuracy 0.76 vs 0.86 after 200 steps at temperature 0.2, and at 0.1 a phase of
collapse to ln(batch) first). Each block maps a length L to exactly ceil(L / downsample), so
T' = ceil(T / downsample**layers) (16 for T = 128 with the defaults) and any T >= 1 is accepted.
Neighbouring latents overlap in their receptive fields (kernel > stride), as in CPC's audio encoder.

Normalisation is per sample and per time step on purpose: BatchNorm would couple the windows of a batch,
and CPC contrasts each window against the others of its batch, a dependency the network can exploit for
a trivial solution (Hénaff et al. 2020, "Data-Efficient Image Recognition with Contrastive Predictive
Coding", replace BN by layer norm for this reason). Normalising over time as well (GroupNorm) would let
every latent see statistics of the future it is asked to predict. The encoder has no buffers and no input
normalisation of its own: the pipeline z-normalises every series (UCR convention) before it gets here.
"""

from __future__ import annotations

from torch import Tensor, nn

SERIES_BACKBONES = ("conv",)


class TimeStepLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, T] at each time step separately (no statistics across time)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class SeriesEncoder(nn.Module):
    """Strided 1-D conv stack: float windows [B, channels, T] -> latents [B, hidden, ceil(T / downsample**layers)].

    Args:
        channels: input variables per time step (1 for univariate series).
        hidden: width of every block and of the latents (the feature_dim).
        layers: number of strided blocks.
        downsample: stride of each block; the latent rate is one per downsample**layers input points.
    """

    def __init__(self, channels: int = 1, hidden: int = 64, layers: int = 3, downsample: int = 2) -> None:
        super().__init__()
        for arg, value in (("channels", channels), ("hidden", hidden), ("layers", layers), ("downsample", downsample)):
            if value < 1:
                raise ValueError(f"SeriesEncoder: {arg} must be >= 1, got {value}")
        self.channels, self.hidden, self.layers, self.downsample = channels, hidden, layers, downsample
        blocks: list[nn.Module] = []
        for index in range(layers):
            block = [
                # no bias: the LayerNorm right after adds its own
                nn.Conv1d(channels if index == 0 else hidden, hidden, 2 * downsample + 1, stride=downsample,
                          padding=downsample, bias=False),
                TimeStepLayerNorm(hidden),
            ]
            if index < layers - 1:
                block.append(nn.ReLU(inplace=True))
            blocks.append(nn.Sequential(*block))
        self.blocks = nn.Sequential(*blocks)

    def latent_length(self, length: int) -> int:
        """T' for an input of `length` points: ceil(length / downsample**layers)."""
        # ceil(ceil(L / a) / b) == ceil(L / (a * b)) for positive integers, so the blocks compose exactly
        return -(-length // self.downsample ** self.layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[1] != self.channels:
            raise ValueError(f"SeriesEncoder expects windows [B, {self.channels}, T], got {list(x.shape)}")
        return self.blocks(x)

    def pooled(self, x: Tensor) -> Tensor:
        """Features for downstream use: the latents' mean over time, [B, hidden]."""
        return self(x).mean(dim=2)


class PooledSeriesEncoder(nn.Module):
    """What gets published: windows [B, C, T] -> `encoder.pooled` features [B, feature_dim].

    It shares the wrapped encoder's parameters (its state_dict keys are the encoder's, prefixed `encoder.`).
    """

    def __init__(self, encoder: SeriesEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder.pooled(x)


def build_series_encoder(name: str = "conv", channels: int = 1, **options: int) -> tuple[SeriesEncoder, int]:
    """Returns (encoder, feature_dim) for one of SERIES_BACKBONES; `options` go to its constructor."""
    if name != "conv":
        raise ValueError(f"unknown series backbone '{name}'; valid: {', '.join(SERIES_BACKBONES)}")
    encoder = SeriesEncoder(channels, **options)
    return encoder, encoder.hidden
