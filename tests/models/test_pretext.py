"""Rotation and jigsaw pretext tasks against their definitions, standalone and as auxiliary heads."""

import copy
import itertools
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from streamssl.models import build_backbone, build_method
from streamssl.models.backbones import SplitBatchNorm2d
from streamssl.models.bn import running_stat_layers, running_stats_frozen
from streamssl.models.jigsaw import Jigsaw, JigsawHead
from streamssl.models.jigsaw_puzzle import (
    _greedy_permutations,
    hamming_permutations,
    jigsaw_cell,
    jigsaw_tiles,
    normalize_tiles,
    shuffle_tiles,
)
from streamssl.models.method import Method, ViewSpec, embedding_std
from streamssl.models.moco import MoCo
from streamssl.models.multitask import MultiTask
from streamssl.models.rotation import Rotation, RotationHead, rotate_batch

BATCH = 8
SIDE = 24


def _tiny_backbone() -> tuple[nn.Module, int]:
    """Small enough for many optimizer steps in a test; like the convnet, it pools to a feature vector."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1), norm1=nn.BatchNorm2d(16), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(16, 32, 3, padding=1), norm2=nn.BatchNorm2d(32), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
    )), 32


def _images(batch: int = BATCH, side: int = SIDE) -> torch.Tensor:
    return torch.randn(batch, 1, side, side)


def _running_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BN running statistic under `module` (running_mean, running_var, num_batches_tracked)."""
    return {name: buffer.clone() for name, buffer in module.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def _assert_same_stats(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------------------------------------
# Permutation set


def _pairwise_hamming(permutations: np.ndarray) -> np.ndarray:
    return (permutations[:, None, :] != permutations[None, :, :]).sum(axis=2)


def test_hamming_permutations_are_distinct_valid_and_as_far_apart_as_reported() -> None:
    permutations, min_distance = hamming_permutations(100, seed=0)
    assert permutations.shape == (100, 9) and permutations.dtype == torch.int64
    table = permutations.numpy()
    assert (np.sort(table, axis=1) == np.arange(9)).all()
    assert len({tuple(row) for row in table}) == 100
    distances = _pairwise_hamming(table)
    np.fill_diagonal(distances, 99)
    assert distances.min() == min_distance
    assert min_distance >= 6  # random sets of 100 have pairs at distance 2


def test_each_greedy_choice_is_a_farthest_remaining_permutation() -> None:
    # The definition, checked step by step over all 9! candidates: the j-th choice maximises the minimum
    # distance to the first j choices.
    table, _ = _greedy_permutations(20, 3, 9)
    candidates = np.array(list(itertools.permutations(range(9))), dtype=np.int64)
    min_distance = np.full(len(candidates), 9)
    for j in range(1, len(table)):
        min_distance = np.minimum(min_distance, (candidates != table[j - 1]).sum(axis=1))
        chosen_distance = (table[:j] != table[j]).sum(axis=1).min()
        assert chosen_distance == min_distance.max()


def test_hamming_permutations_depend_on_the_seed_only() -> None:
    _greedy_permutations.cache_clear()
    first, first_distance = hamming_permutations(30, seed=1)
    _greedy_permutations.cache_clear()  # rebuilt, not served from the cache
    again, again_distance = hamming_permutations(30, seed=1)
    other, _ = hamming_permutations(30, seed=2)
    assert torch.equal(first, again) and first_distance == again_distance
    assert not torch.equal(first, other)
    first[0, 0] = 5  # callers get their own copy of the cached table
    assert not torch.equal(first, hamming_permutations(30, seed=1)[0])


def test_hamming_permutations_reject_impossible_counts() -> None:
    with pytest.raises(ValueError, match="count"):
        hamming_permutations(1)


# ----------------------------------------------------------------------------------------------------------
# Rotation


def test_rotate_batch_turns_each_image_counter_clockwise_by_its_label() -> None:
    images = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)  # every pixel distinct
    rotated, labels = rotate_batch(images)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    last = 4
    for k in range(4):
        for i in range(2):
            out, image = rotated[2 * k + i, 0], images[i, 0]
            for r in range(5):
                for c in range(5):
                    source = [(r, c), (c, last - r), (last - r, last - c), (last - c, r)][k]
                    assert out[r, c] == image[source]
    # The top-left pixel of the image ends up bottom-left after a quarter turn counter-clockwise.
    assert rotated[2, 0, last, 0] == images[0, 0, 0, 0]


def test_rotate_batch_crops_non_square_images_to_their_centre() -> None:
    images = torch.randn(3, 2, 10, 14)
    rotated, _ = rotate_batch(images)
    assert rotated.shape == (12, 2, 10, 10)
    torch.testing.assert_close(rotated[:3], images[..., 2:12], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Jigsaw tiles


def test_jigsaw_tiles_are_the_pieces_at_the_drawn_positions() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 2, 28, 31)  # cell = 28 // 3 = 9: grid 27 px, slack 1 px down, 4 px across
    grid_origin = torch.stack([torch.randint(0, 2, (3,)), torch.randint(0, 5, (3,))], dim=1)
    tile_offsets = torch.randint(0, 3, (3, 9, 2))  # cell 9 - tile 7 = up to 2 px of jitter
    tiles = jigsaw_tiles(images, 7, grid_origin, tile_offsets)
    assert tiles.shape == (3, 9, 2, 7, 7)
    for b in range(3):
        for piece in range(9):
            top = int(grid_origin[b, 0]) + piece // 3 * 9 + int(tile_offsets[b, piece, 0])
            left = int(grid_origin[b, 1]) + piece % 3 * 9 + int(tile_offsets[b, piece, 1])
            torch.testing.assert_close(tiles[b, piece], images[b, :, top:top + 7, left:left + 7], rtol=0, atol=0)


def test_tiles_without_jitter_reassemble_the_image() -> None:
    images = torch.randn(2, 1, 24, 24)
    tiles = jigsaw_tiles(images, 8, torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 9, 2, dtype=torch.long))
    rows = [torch.cat(list(tiles[:, 3 * r:3 * r + 3].unbind(1)), dim=-1) for r in range(3)]
    torch.testing.assert_close(torch.cat(rows, dim=-2), images, rtol=0, atol=0)


def test_unshuffling_with_the_permutation_restores_the_tiles() -> None:
    torch.manual_seed(0)
    tiles = torch.randn(4, 9, 1, 3, 3)
    permutations, _ = hamming_permutations(10)
    order = permutations[torch.tensor([0, 3, 9, 3])]
    shuffled = shuffle_tiles(tiles, order)
    for b in range(4):
        for j in range(9):
            assert torch.equal(shuffled[b, j], tiles[b, order[b, j]])
    restored = torch.empty_like(shuffled)
    for b in range(4):
        restored[b, order[b]] = shuffled[b]  # tile order[b, j] was put at position j
    assert torch.equal(restored, tiles)
    assert torch.equal(shuffle_tiles(shuffled, torch.argsort(order, dim=1)), tiles)


def test_normalize_tiles_gives_each_tile_zero_mean_and_unit_std() -> None:
    tiles = torch.randn(2, 9, 3, 4, 4) * 5 + 2
    tiles[1, 4] = 7.0  # a blank tile
    normalised = normalize_tiles(tiles)
    flat = normalised.flatten(2)
    torch.testing.assert_close(flat[0].mean(dim=1), torch.zeros(9), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat[0].std(dim=1, unbiased=False), torch.ones(9), atol=1e-4, rtol=0)
    assert torch.equal(normalised[1, 4], torch.zeros(3, 4, 4))


def _coordinate_images(batch: int, side: int) -> torch.Tensor:
    """Channel 0 holds each pixel's row, channel 1 its column: a tile then says where it was cut."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows, cols]).float().expand(batch, 2, side, side)


@pytest.mark.parametrize("side", [28, 32])
def test_default_tiles_keep_a_gap_of_at_least_two_pixels_and_still_jitter(side: int) -> None:
    torch.manual_seed(0)
    head = JigsawHead(8)
    assert (head.tile, head.gap) == (6, 2)
    images = _coordinate_images(512, side)
    grid_origin, tile_offsets, _ = head._draw_puzzles(images)
    cell = jigsaw_cell(side, side)
    assert tile_offsets.min() >= 0 and tile_offsets.max() <= cell - head.tile  # every tile inside its cell
    tiles = jigsaw_tiles(images, head.tile, grid_origin, tile_offsets)  # [B, 9, 2, 6, 6], grid order
    first_row, last_row = tiles[:, :, 0, 0, 0], tiles[:, :, 0, -1, 0]  # source rows of each tile's first/last row
    first_col, last_col = tiles[:, :, 1, 0, 0], tiles[:, :, 1, 0, -1]
    gaps = []
    for r in range(3):
        for c in range(2):  # piece 3r + c and its right-hand neighbour
            gaps.append(first_col[:, 3 * r + c + 1] - last_col[:, 3 * r + c] - 1)
    for r in range(2):
        for c in range(3):  # piece 3r + c and the one below
            gaps.append(first_row[:, 3 * r + c + 3] - last_row[:, 3 * r + c] - 1)
    gaps = torch.stack(gaps)
    assert gaps.min() == 2  # the guarantee, reached
    assert gaps.max() == cell - head.tile + (cell - head.tile - head.gap)  # the offsets do vary


def test_puzzles_are_the_resized_normalised_shuffled_tiles_and_pass_through_the_convnet() -> None:
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("convnet", 1)
    head = JigsawHead(feature_dim, num_permutations=10)
    images = _images(4, 28)
    torch.manual_seed(3)
    tiles, labels = head.puzzles(images)
    assert tiles.shape == (4 * 9, 1, 12, 12)
    torch.manual_seed(3)  # the same draws: the puzzles are a function of torch's default generator alone
    grid_origin, tile_offsets, same_labels = head._draw_puzzles(images)
    assert torch.equal(labels, same_labels)
    expected = shuffle_tiles(jigsaw_tiles(images, 6, grid_origin, tile_offsets), head.permutations[labels])
    expected = torch.nn.functional.interpolate(expected.flatten(0, 1), size=(12, 12), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(tiles, normalize_tiles(expected), rtol=0, atol=0)
    flat = tiles.flatten(1)
    torch.testing.assert_close(flat.mean(dim=1), torch.zeros(36), atol=1e-5, rtol=0)
    output = head(backbone, images)  # 12 px tiles survive the ConvNet's three max-pools
    assert output.features.shape == (36, feature_dim) and torch.isfinite(output.features).all()


def test_channels_last_input_gives_channels_last_tiles() -> None:
    head = JigsawHead(8)
    tiles, _ = head.puzzles(_images(2, 28).contiguous(memory_format=torch.channels_last))
    assert tiles.is_contiguous(memory_format=torch.channels_last)


def test_jigsaw_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="tile >= 1"):
        JigsawHead(8, gap=-1)
    head = JigsawHead(8, tile=7, gap=3)  # 9 px cells of 28 px images are too small for 7 + 3
    with pytest.raises(ValueError, match="at least 30 px"):
        head.puzzles(_images(2, 28))


# ----------------------------------------------------------------------------------------------------------
# Batch-norm running statistics


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4), nn.BatchNorm2d(4, momentum=None), SplitBatchNorm2d(4, 2)],
                         ids=["momentum", "cumulative", "split"])
def test_running_stats_frozen_trains_with_batch_stats_and_restores_the_running_ones(norm: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm).train()
    model(torch.randn(8, 1, 6, 6) * 3 + 1)  # running stats away from their initial values
    before = _running_stats(model)
    buffers = [norm.running_mean, norm.running_var, norm.num_batches_tracked]
    reference = copy.deepcopy(model)
    x = torch.randn(8, 1, 6, 6)
    with running_stats_frozen(model):
        out = model(x)
    _assert_same_stats(_running_stats(model), before)
    assert all(now is then for now, then in zip([norm.running_mean, norm.running_var, norm.num_batches_tracked],
                                                buffers, strict=True))  # the very tensors: state_dict, DDP hold them
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)  # batch statistics, as in a normal pass
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match="boom"), running_stats_frozen(model):
        model(x)
        raise RuntimeError("boom")
    _assert_same_stats(_running_stats(model), before)  # restored after an exception too
    model(x)
    assert not torch.equal(norm.running_mean, before["1.running_mean"])  # outside, updates happen as usual


def test_running_stat_layers_skip_norms_without_running_stats() -> None:
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2, track_running_stats=False), nn.InstanceNorm2d(2),
                          nn.GroupNorm(1, 2))
    assert running_stat_layers(model) == [model[0]]


def test_jigsaw_tile_pass_leaves_the_running_stats_alone() -> None:
    torch.manual_seed(0)
    backbone, feature_dim = _tiny_backbone()
    backbone.train()
    before = _running_stats(backbone)
    output = JigsawHead(feature_dim)(backbone, _images())
    _assert_same_stats(_running_stats(backbone), before)
    output.loss.backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_jigsaw_running_stats_are_those_of_the_full_view() -> None:
    torch.manual_seed(0)
    method = Jigsaw(*_tiny_backbone())
    reference = copy.deepcopy(method.backbone)
    images = _images()
    _, logs = method([images])
    with torch.no_grad():
        full_features = reference(images)  # one training-mode pass of the untiled view, nothing else
    _assert_same_stats(_running_stats(method.backbone), _running_stats(reference))
    torch.testing.assert_close(logs["embedding_std"], embedding_std(full_features))


def test_auxiliary_jigsaw_leaves_the_running_stats_to_the_inner_method() -> None:
    torch.manual_seed(0)
    multitask = MultiTask(_tiny_moco(), {"jigsaw": 1.0})
    alone = copy.deepcopy(multitask.inner)
    views = [_images(), _images()]
    rng = torch.get_rng_state()
    multitask(views)
    torch.set_rng_state(rng)  # the inner method draws first, so it sees the same key shuffle
    alone(views)
    _assert_same_stats(_running_stats(multitask.inner.backbone), _running_stats(alone.backbone))


# ----------------------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize(("head_class", "classes"), [(RotationHead, 4), (JigsawHead, 100)])
def test_head_starts_near_chance_and_overfits_a_fixed_batch(head_class: type[nn.Module], classes: int) -> None:
    torch.manual_seed(0)
    backbone, feature_dim = _tiny_backbone()
    head = head_class(feature_dim)
    images = _images()
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same puzzles every step: a fixed batch to overfit
        output = head(backbone, images)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[0] == pytest.approx(math.log(classes), abs=0.15)
    assert losses[-1] < 0.5 * losses[0]
    assert output.accuracy.item() > 0.5


def test_jigsaw_head_draws_from_the_default_generator_and_refuses_small_images() -> None:
    backbone, feature_dim = _tiny_backbone()
    head = JigsawHead(feature_dim).eval()
    backbone.eval()
    images = torch.randn(4, 1, 28, 28)
    torch.manual_seed(5)
    first = head(backbone, images)
    torch.manual_seed(5)
    same = head(backbone, images)
    second = head(backbone, images)
    assert torch.equal(first.loss, same.loss) and not torch.equal(first.loss, second.loss)
    assert first.features.shape == (4 * 9, feature_dim)
    with pytest.raises(ValueError, match="at least 24 px"):
        head(backbone, torch.randn(4, 1, 23, 30))


# ----------------------------------------------------------------------------------------------------------
# Standalone methods


@pytest.mark.parametrize(("method_class", "accuracy_log"), [(Rotation, "rotation_accuracy"), (Jigsaw, "jigsaw_accuracy")])
def test_standalone_method_under_bf16_autocast_with_the_convnet(method_class: type[Method], accuracy_log: str) -> None:
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("convnet", 1)
    method = method_class(backbone, feature_dim)
    assert method.num_views == 1 and method.encoder() is backbone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = method([_images(4, 28)])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert set(logs) == {accuracy_log, "embedding_std"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())
    assert all(p.grad is not None for p in method.parameters())


def test_jigsaw_checkpoint_carries_the_permutation_set_and_bn_stats() -> None:
    torch.manual_seed(0)
    backbone, feature_dim = _tiny_backbone()
    trained = Jigsaw(backbone, feature_dim, num_permutations=12, permutation_seed=4)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(2):
        loss, _ = trained([_images()])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = trained.state_dict()
    assert torch.equal(state["head.permutations"], hamming_permutations(12, seed=4)[0])
    assert int(state["backbone.norm1.num_batches_tracked"]) == 2  # the full view's passes only

    other_backbone, _ = _tiny_backbone()
    resumed = Jigsaw(other_backbone, feature_dim, num_permutations=12, permutation_seed=4)
    resumed.load_state_dict(state)
    images = _images()
    rng = torch.get_rng_state()
    loss, _ = trained([images])
    torch.set_rng_state(rng)  # the trainer checkpoints the global RNG: it draws the puzzles
    resumed_loss, _ = resumed([images])
    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)
    _assert_same_stats(_running_stats(resumed), _running_stats(trained))


# ----------------------------------------------------------------------------------------------------------
# MultiTask


def _tiny_moco() -> MoCo:
    backbone, feature_dim = _tiny_backbone()
    return MoCo(backbone, feature_dim, dim=8, queue_size=16)


def test_multitask_loss_is_inner_loss_plus_weighted_aux_losses() -> None:
    torch.manual_seed(0)
    multitask = MultiTask(_tiny_moco(), {"rotation": 0.5, "jigsaw": 0.25})
    pieces = copy.deepcopy(multitask)
    views = [_images(), _images()]
    rng = torch.get_rng_state()
    loss, logs = multitask(views)

    torch.set_rng_state(rng)  # same key shuffle and puzzles, drawn in the same order: inner, rotation, jigsaw
    inner_loss, inner_logs = pieces.inner(views)
    rotation = pieces.heads["rotation"](pieces.inner.backbone, views[0])
    jigsaw = pieces.heads["jigsaw"](pieces.inner.backbone, views[0])

    torch.testing.assert_close(loss, inner_loss + 0.5 * rotation.loss + 0.25 * jigsaw.loss)
    assert set(logs) == {*inner_logs, "aux_rotation_loss", "rotation_accuracy", "aux_jigsaw_loss", "jigsaw_accuracy"}
    torch.testing.assert_close(logs["aux_jigsaw_loss"], jigsaw.loss.detach())
    torch.testing.assert_close(logs["embedding_std"], inner_logs["embedding_std"])
    loss.backward()
    assert all(p.grad is not None for p in multitask.heads.parameters())


def test_zero_weight_adds_no_head_and_no_parameters() -> None:
    torch.manual_seed(0)
    inner = _tiny_moco()
    inner_parameters = sum(p.numel() for p in inner.parameters())
    multitask = MultiTask(inner, {"rotation": 0.5, "jigsaw": 0.0})
    assert list(multitask.heads) == ["rotation"]
    rotation_parameters = sum(p.numel() for p in RotationHead(inner.feature_dim).parameters())
    assert sum(p.numel() for p in multitask.parameters()) == inner_parameters + rotation_parameters
    _, logs = multitask([_images(), _images()])
    assert "aux_jigsaw_loss" not in logs and "aux_rotation_loss" in logs


def test_multitask_looks_like_its_inner_method_to_the_trainer() -> None:
    class Recorder(Method):
        name = "recorder"
        num_views = 3
        small_crops = 2
        small_crop_size = 12
        small_crop_scale = (0.1, 0.3)

        def __init__(self) -> None:
            super().__init__(*_tiny_backbone())
            self.steps: list[int] = []

        def forward(self, views: list[torch.Tensor], ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
            return self.backbone(views[0]).sum() * 0, {"embedding_std": torch.tensor(0.0)}

        def on_step_end(self, step: int) -> None:
            self.steps.append(step)

    inner = Recorder()
    multitask = MultiTask(inner, {"rotation": 1.0})
    assert (multitask.name, multitask.views()) == ("recorder", ViewSpec(3, 2, 12, (0.1, 0.3)))
    assert multitask.backbone is inner.backbone and multitask.encoder() is inner.backbone
    assert multitask.feature_dim == inner.feature_dim
    multitask.on_step_end(7)
    assert inner.steps == [7]


def test_multitask_state_dict_layout_and_round_trip() -> None:
    torch.manual_seed(0)
    trained = MultiTask(_tiny_moco(), {"rotation": 0.5, "jigsaw": 0.5})
    for _ in range(2):
        trained([_images(), _images()])
    state = trained.state_dict()
    assert {"inner.queue", "inner.queue_ptr", "inner.backbone.conv1.weight", "heads.rotation.classifier.weight",
            "heads.jigsaw.permutations"} <= set(state)
    assert not any(key.startswith("backbone.") for key in state)  # the shared backbone is stored once

    torch.manual_seed(123)
    resumed = MultiTask(_tiny_moco(), {"rotation": 0.5, "jigsaw": 0.5})
    resumed.load_state_dict(state)
    views = [_images(), _images()]
    rng = torch.get_rng_state()
    loss, _ = trained(views)
    torch.set_rng_state(rng)
    resumed_loss, _ = resumed(views)
    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)


def test_multitask_rejects_unknown_tasks_and_negative_weights() -> None:
    with pytest.raises(ValueError, match="valid: rotation, jigsaw"):
        MultiTask(_tiny_moco(), {"colorization": 1.0})
    with pytest.raises(ValueError, match=r"rotation=-0\.5"):
        MultiTask(_tiny_moco(), {"rotation": -0.5})


def test_registry_wraps_a_method_when_aux_weights_are_set() -> None:
    backbone, feature_dim = _tiny_backbone()
    method = build_method("moco", backbone, feature_dim, {"queue_size": 16}, {"rotation": 0.5, "jigsaw": 0.0})
    assert isinstance(method, MultiTask) and isinstance(method.inner, MoCo)
    assert list(method.heads) == ["rotation"] and method.name == "moco"
