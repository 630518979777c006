"""Batch normalisation helpers: forward passes whose inputs must not shape the running statistics.

A BatchNorm layer in training mode normalises with the batch's own statistics and also folds them into
its running mean and variance (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift"). The running statistics are what the layer uses in eval
mode, i.e. in the published encoder on full-size images. A pass over inputs unlike those (jigsaw tiles, a
pretext task's transformed images) should still train with batch statistics but leave the running ones
alone, or the published encoder normalises full images with statistics of something else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase


def running_stat_layers(module: nn.Module) -> list[_NormBase]:
    """The normalisation layers under `module` (BatchNorm*, SyncBatchNorm, their subclasses, InstanceNorm with
    tracked statistics) that keep running statistics."""
    return [layer for layer in module.modules()
            if isinstance(layer, _NormBase) and layer.track_running_stats and layer.running_mean is not None]


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside the block, forward passes through `module` leave its normalisation layers' running statistics
    (running_mean, running_var, num_batches_tracked) as they were; everything else is untouched.

    Layers in training mode still normalise with the batch statistics and pass gradients as usual. Inside
    the block each layer's buffers are swapped for scratch copies, which the passes update and which are
    dropped on exit (also after an exception), when the original tensors are put back. Not momentum 0:
    swapping works for every subclass whatever its own update rule (SplitBatchNorm2d, momentum=None's
    cumulative average, num_batches_tracked). Not saving the values and writing them back in place:
    batch_norm's autograd node keeps the running-statistic tensors it was given (on the CPU), and writing
    into them before `backward` would fail it with an in-place modification error. The cost is a copy of
    a few KiB per layer.
    """
    layers = running_stat_layers(module)
    originals: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for layer in layers:
        mean, var = layer.running_mean, layer.running_var
        assert mean is not None and var is not None  # running_stat_layers keeps only layers that track them
        originals.append((mean, var, layer.num_batches_tracked))
        layer.running_mean = mean.clone()
        layer.running_var = var.clone()
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked = layer.num_batches_tracked.clone()
    try:
        yield
    finally:
        for layer, (mean, var, count) in zip(layers, originals, strict=True):
            layer.running_mean, layer.running_var = mean, var
            if count is not None:
                layer.num_batches_tracked = count
