"""SwAV against its definition: Sinkhorn marginals and stability, swapped prediction, prototype normalisation
and freeze, the queue's FIFO order, start-when-full rule and staged writes, schedules over the horizon, multi-crop
and its BN running statistics, resume."""

import copy
import inspect
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import Method, build_backbone
from streamssl.models.losses import swapped_prediction_loss
from streamssl.models.multicrop import embed_crops
from streamssl.models.sinkhorn import sinkhorn
from streamssl.models.swav import SwAV
from streamssl.pipeline.config import load_config

BATCH = 4
K = 6


def _tiny_swav(**options: object) -> SwAV:
    backbone, feature_dim = build_backbone("convnet", 1)
    defaults = {"dim": 8, "num_prototypes": K, "small_crops": 2, "small_crop_size": 8, "queue_size": 0,
                "freeze_prototypes": 0.0, "freeze_prototypes_steps": 0}
    return SwAV(backbone, feature_dim, **{**defaults, **options})


def _views(batch: int = BATCH, small_crops: int = 2) -> list[torch.Tensor]:
    full = [torch.rand(batch, 1, 12, 12) for _ in range(2)]
    return full + [torch.rand(batch, 1, 8, 8) for _ in range(small_crops)]


def _cosine_scores(samples: int, prototypes: int) -> torch.Tensor:
    return F.normalize(torch.randn(samples, 8, dtype=torch.float64), dim=1) @ \
        F.normalize(torch.randn(prototypes, 8, dtype=torch.float64), dim=1).T


def _sinkhorn_by_loops(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The official exp-domain algorithm written out entry by entry (scores small enough not to overflow)."""
    rows, cols = scores.shape
    q = [[math.exp(value / epsilon) for value in row] for row in scores.tolist()]
    for _ in range(iterations):
        for j in range(cols):  # every prototype gets B/K of the mass
            column_sum = sum(q[i][j] for i in range(rows))
            for i in range(rows):
                q[i][j] *= rows / cols / column_sum
        for i in range(rows):  # every sample's assignment sums to 1
            row_sum = sum(q[i])
            q[i] = [value / row_sum for value in q[i]]
    return torch.tensor(q, dtype=torch.float32)


@pytest.mark.parametrize(("samples", "prototypes", "iterations"), [(5, 3, 1), (5, 3, 3), (4, 7, 3), (6, 6, 10)])
def test_sinkhorn_equals_the_alternating_normalisations(samples: int, prototypes: int, iterations: int) -> None:
    torch.manual_seed(0)
    scores = _cosine_scores(samples, prototypes)
    torch.testing.assert_close(sinkhorn(scores, 0.05, iterations), _sinkhorn_by_loops(scores, 0.05, iterations),
                               rtol=1e-5, atol=1e-6)


def test_sinkhorn_rows_sum_to_one_and_columns_converge_to_the_equal_partition() -> None:
    torch.manual_seed(0)
    scores = _cosine_scores(40, 8)

    def column_error(iterations: int) -> float:
        codes = sinkhorn(scores, 0.05, iterations)
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(40), rtol=0, atol=1e-6)
        return (codes.sum(dim=0) - 40 / 8).abs().max().item()

    errors = [column_error(iterations) for iterations in (1, 3, 10, 1000)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.05
    assert errors[-1] < 1e-4


def test_sinkhorn_gives_every_prototype_b_over_k_before_the_last_row_normalisation() -> None:
    # The last step only rescales rows: codes = diag(1/r) P with P's columns summing to B/K exactly. With
    # B < K, a positive d with codes^T d = B/K exists only for such a matrix (K equations, B unknowns).
    torch.manual_seed(0)
    samples, prototypes = 4, 9
    codes = sinkhorn(_cosine_scores(samples, prototypes), 0.05, 3).double()
    target = torch.full((prototypes, 1), samples / prototypes, dtype=torch.float64)

    row_scales = torch.linalg.lstsq(codes.T, target).solution
    assert (codes.T @ row_scales - target).abs().max() < 1e-5
    assert (row_scales > 0).all()

    row_stochastic = torch.softmax(_cosine_scores(samples, prototypes) / 0.05, dim=1)  # no equal partition
    other = torch.linalg.lstsq(row_stochastic.T, target).solution
    assert (row_stochastic.T @ other - target).abs().max() > 1e-2


@pytest.mark.parametrize("constant", [-50.0, 1000.0])
def test_sinkhorn_is_invariant_to_a_constant_added_to_all_scores(constant: float) -> None:
    torch.manual_seed(0)
    scores = _cosine_scores(7, 5)
    torch.testing.assert_close(sinkhorn(scores + constant), sinkhorn(scores), rtol=0, atol=1e-6)


def test_sinkhorn_stays_finite_for_large_scores() -> None:
    torch.manual_seed(0)
    scores = torch.randn(8, 5) * 1e4
    scores[3] -= 1e6  # a sample far below all others: every exp of its row would underflow in the exp domain
    scores[:, 2] += 1e6  # and a prototype far above the rest
    codes = sinkhorn(scores)
    assert torch.isfinite(codes).all() and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(8), rtol=0, atol=1e-6)


def test_sinkhorn_needs_an_iteration() -> None:
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn(torch.zeros(2, 2), 0.05, 0)


def test_swapped_prediction_loss_equals_a_loop_over_view_pairs() -> None:
    torch.manual_seed(0)
    views, samples, prototypes, temperature = 4, 3, 5, 0.1
    scores = [torch.randn(samples, prototypes, dtype=torch.float64) for _ in range(views)]
    codes = [torch.softmax(torch.randn(samples, prototypes, dtype=torch.float64), dim=1) for _ in range(2)]

    per_code_view = []
    for code_view, q in enumerate(codes):
        pair_losses = []
        for view in range(views):
            if view == code_view:
                continue
            sample_losses = []
            for b in range(samples):
                logits = [value / temperature for value in scores[view][b].tolist()]
                log_norm = math.log(sum(math.exp(logit) for logit in logits))
                sample_losses.append(-sum(q[b, k].item() * (logits[k] - log_norm) for k in range(prototypes)))
            pair_losses.append(sum(sample_losses) / samples)
        per_code_view.append(sum(pair_losses) / len(pair_losses))
    expected = sum(per_code_view) / len(per_code_view)

    assert swapped_prediction_loss(scores, codes, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_loss_and_logs_follow_the_definition_with_codes_from_the_full_views_only() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav()
    views = _views()
    with torch.no_grad():  # train-mode BN depends on the batch only, so this is what forward will compute
        embeddings = embed_crops(swav.backbone, swav.head, views, 2)
        scores = [z @ swav.prototypes.weight.T for z in embeddings]
        codes = [sinkhorn(scores[view]) for view in range(2)]
        expected = swapped_prediction_loss(scores, codes, 0.1)

    loss, logs = swav(views)

    torch.testing.assert_close(loss.detach(), expected)
    used = {int(k) for view_codes in codes for k in view_codes.argmax(dim=1)}
    assert logs["prototype_usage"].item() == pytest.approx(len(used) / K)
    assert logs["loss_over_ln_k"].item() == pytest.approx(expected.item() / math.log(K), rel=1e-5)
    assert logs["queue_fill"].item() == 0.0
    torch.testing.assert_close(logs["embedding_std"], F.normalize(torch.cat(embeddings[:2]), dim=1).std(dim=0).mean())
    assert set(logs) == {"embedding_std", "loss_over_ln_k", "queue_fill", "prototype_usage"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())


def test_crops_of_one_size_share_a_backbone_pass_without_changing_embeddings() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav().eval()  # eval BN: every embedding depends on its own image only
    views = _views()
    with torch.no_grad():
        expected = [F.normalize(swav.head(swav.backbone(view)), dim=1) for view in views]
        embeddings = embed_crops(swav.backbone, swav.head, views, 2)
    assert len(embeddings) == len(views)
    for got, want in zip(embeddings, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_prototypes_are_renormalised_before_use() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav()
    twin = _tiny_swav()
    twin.load_state_dict(swav.state_dict())
    with torch.no_grad():
        swav.prototypes.weight.mul_(torch.rand(K, 1) * 5 + 0.1)  # lengths change, directions do not
    views = _views()

    loss, _ = swav(views)

    torch.testing.assert_close(loss, twin(views)[0])
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), torch.ones(K))
    optimizer = torch.optim.SGD(swav.parameters(), lr=0.5)
    loss.backward()
    optimizer.step()
    assert not torch.allclose(swav.prototypes.weight.norm(dim=1), torch.ones(K))
    swav(views)
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), torch.ones(K))


def _sgd_step(swav: SwAV, optimizer: torch.optim.Optimizer, step: int, views: list[torch.Tensor] | None = None) -> None:
    """One taken step in the trainer's order: forward, backward, optimizer step, commit, on_step_end."""
    optimizer.zero_grad()
    swav(_views() if views is None else views)[0].backward()
    optimizer.step()
    swav.commit_step()
    swav.on_step_end(step)


def test_prototypes_get_no_gradient_while_frozen() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav(freeze_prototypes_steps=2)
    for step in range(3):
        swav.zero_grad(set_to_none=True)
        swav(_views())[0].backward()
        if step < 2:
            assert swav.prototypes.weight.grad is None
        else:
            assert swav.prototypes.weight.grad is not None and swav.prototypes.weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in [*swav.backbone.parameters(), *swav.head.parameters()])
        swav.on_step_end(step)
    assert swav.step.item() == 3


@pytest.mark.parametrize(("horizon", "frozen_steps", "queue_from"), [(0, 3, 7), (40, 4, 20), (200, 20, 100)])
def test_schedules_follow_the_horizon_and_fall_back_to_steps_without_one(horizon: int, frozen_steps: int,
                                                                         queue_from: int) -> None:
    swav = _tiny_swav(freeze_prototypes=0.1, freeze_prototypes_steps=3, queue_start=0.5, queue_start_step=7,
                      queue_size=8)
    swav.horizon_steps = horizon  # 0: unbounded, the step counts apply
    assert (swav.progress(5) is None) == (horizon == 0)
    assert [swav.prototypes_frozen(step) for step in range(250)] == [step < frozen_steps for step in range(250)]
    assert [swav.queue_started(step) for step in range(250)] == [step >= queue_from for step in range(250)]


def test_defaults_freeze_and_start_the_queue_within_a_short_run() -> None:
    backbone, feature_dim = build_backbone("convnet", 1)
    swav = SwAV(backbone, feature_dim)
    swav.horizon_steps = 270
    frozen = sum(swav.prototypes_frozen(step) for step in range(270))
    queue_from = next(step for step in range(270) if swav.queue_started(step))
    assert frozen == 14 and queue_from == 41  # 5% and 15% of the run
    assert queue_from + swav.queue_size // 256 < 270 // 4  # full, in Sinkhorn, within the first quarter
    swav.horizon_steps = 0  # an unbounded stream: the step fallbacks
    assert swav.prototypes_frozen(249) and not swav.prototypes_frozen(250)
    assert not swav.queue_started(499) and swav.queue_started(500)


def test_prototype_freeze_follows_progress_in_forward() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav(freeze_prototypes=0.25, freeze_prototypes_steps=100)
    swav.horizon_steps = 8  # steps 0 and 1 frozen (progress 0, 1/8), from step 2 trained
    optimizer = torch.optim.SGD(swav.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        swav(_views())[0].backward()
        assert (swav.prototypes.weight.grad is None) == (step < 2)
        optimizer.step()
        swav.commit_step()
        swav.on_step_end(step)


def test_queue_keeps_filling_once_started_even_if_the_horizon_moves_out() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav(queue_size=8, queue_start=0.5, queue_start_step=100)
    swav.horizon_steps = 4
    swav.step.fill_(2)  # progress 0.5: the queue starts
    swav(_views())
    swav.commit_step()
    assert swav.features_enqueued.item() == BATCH
    swav.horizon_steps = 40  # a re-estimated horizon: progress 0.05, before the start again
    assert not swav.queue_started(2)
    swav(_views())
    swav.commit_step()
    assert swav.features_enqueued.item() == 2 * BATCH


def test_queue_writes_are_staged_until_the_step_is_committed() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav(queue_size=8, queue_start_step=0)
    _, logs = swav(_views())
    assert logs["queue_fill"].item() == 0.5  # what the queue will hold once this step is committed
    assert swav.features_enqueued.item() == 0 and (swav.queue == 0).all()  # nothing written yet
    swav.discard_step()  # a non-finite loss: the step is not taken
    swav.commit_step()
    assert swav.features_enqueued.item() == 0 and (swav.queue == 0).all()

    views = _views()
    with torch.no_grad():
        expected = torch.stack(embed_crops(swav.backbone, swav.head, views, 2)[:2])
    swav(views)
    swav.commit_step()
    assert swav.features_enqueued.item() == BATCH
    torch.testing.assert_close(swav.queue[:, :BATCH], expected)


def test_sinkhorn_rows_outnumber_the_prototypes_in_the_default_config() -> None:
    cfg = load_config(sets=["method=swav"])  # defaults with the method's recipe applied
    assert cfg.train.batch_size >= cfg.swav.num_prototypes  # even before the queue joins
    assert cfg.train.batch_size + cfg.swav.queue_size >= 10 * cfg.swav.num_prototypes  # and ~10 rows each after


def test_sinkhorn_with_fewer_rows_than_prototypes_cannot_assign() -> None:
    # Why K must stay below B: with K > B the equal partition caps every code at B/K < 1.
    torch.manual_seed(0)
    scores = _cosine_scores(4, 12) * 10  # sharp scores that would otherwise pick one prototype per sample
    assert sinkhorn(scores, 0.05, 1000).max() <= 4 / 12 + 1e-3
    assert sinkhorn(_cosine_scores(48, 12) * 10, 0.05, 1000).max() > 0.9


def test_warns_once_when_sinkhorn_has_fewer_rows_than_prototypes(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="streamssl.models.swav"):
        _tiny_swav()(_views(batch=8))  # 8 rows, 6 prototypes
        assert not caplog.records
        swav = _tiny_swav()
        swav(_views(batch=4))
        swav(_views(batch=4))
    assert len(caplog.records) == 1 and "4 rows for 6 prototypes" in caplog.records[0].getMessage()


def _running_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


@pytest.mark.parametrize("bn_splits", [1, 2])
def test_small_crops_leave_the_backbone_bn_running_statistics_alone(bn_splits: int) -> None:
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("convnet", 1, bn_splits=bn_splits)
    swav = SwAV(backbone, feature_dim, dim=8, num_prototypes=K, small_crops=2, small_crop_size=8, queue_size=0,
                freeze_prototypes=0.0)
    views = _views()
    full_only = copy.deepcopy(swav.backbone)
    full_only(torch.cat(views[:2]))  # what the full-size views alone do to the running statistics
    small_too = copy.deepcopy(full_only)
    small_too(torch.cat(views[2:]))
    assert any(not torch.equal(value, _running_stats(full_only)[name]) for name, value in _running_stats(small_too).items()
               if "running" in name)  # the small crops would move them

    loss, _ = swav(views)
    loss.backward()

    for name, value in _running_stats(full_only).items():
        torch.testing.assert_close(_running_stats(swav.backbone)[name], value, rtol=0, atol=0)
    assert all(p.grad is not None for p in swav.backbone.parameters())  # the small crops still train it


def test_small_crops_are_normalised_by_their_own_batch_statistics() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav()
    views = _views()
    reference = copy.deepcopy(swav)
    with torch.no_grad():
        features = torch.cat([reference.backbone(torch.cat(views[:2])), reference.backbone(torch.cat(views[2:]))])
        expected = F.normalize(reference.head(features), dim=1).chunk(len(views))
        embeddings = embed_crops(swav.backbone, swav.head, views, 2)
    for got, want in zip(embeddings, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_queue_is_fifo_newest_first() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav(queue_size=6)
    first, second, third = (torch.randn(2, BATCH, 8) for _ in range(3))

    swav._enqueue(first)
    torch.testing.assert_close(swav.queue[:, :4], first, rtol=0, atol=0)
    assert (swav.queue[:, 4:] == 0).all()
    swav._enqueue(second)
    torch.testing.assert_close(swav.queue, torch.cat([second, first[:, :2]], dim=1), rtol=0, atol=0)
    swav._enqueue(third)
    torch.testing.assert_close(swav.queue, torch.cat([third, second[:, :2]], dim=1), rtol=0, atol=0)
    assert swav.features_enqueued.item() == 12


def test_queue_joins_sinkhorn_only_once_full() -> None:
    torch.manual_seed(0)
    with_queue = _tiny_swav(queue_size=8, queue_start_step=0)
    without_queue = _tiny_swav()
    shared_state = {name: value for name, value in with_queue.state_dict().items() if name != "queue"}
    without_queue.load_state_dict(shared_state, strict=False)  # all but the (differently sized) queue

    fills = []
    for _ in range(2):  # 4 then 8 of 8 slots filled: not used yet, the codes are the batch-only ones
        views = _views()
        loss, logs = with_queue(views)
        with_queue.commit_step()
        torch.testing.assert_close(loss, without_queue(views)[0])
        fills.append(logs["queue_fill"].item())
    assert fills == [0.5, 1.0]

    views = _views()  # (a queue of copies of this very batch would give the same codes as no queue)

    queued = with_queue.queue.clone()
    prototypes = with_queue.prototypes.weight
    with torch.no_grad():
        embeddings = embed_crops(with_queue.backbone, with_queue.head, views, 2)
        scores = [z @ prototypes.T for z in embeddings]
        codes = [sinkhorn(torch.cat([queued[view] @ prototypes.T, scores[view]]))[-BATCH:] for view in range(2)]
        expected = swapped_prediction_loss(scores, codes, 0.1)
    loss, _ = with_queue(views)
    with_queue.commit_step()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, without_queue(views)[0])
    torch.testing.assert_close(with_queue.queue, torch.cat([torch.stack(embeddings[:2]), queued[:, :4]], dim=1))


def test_queue_starts_filling_at_its_start_step() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav(queue_size=8, queue_start_step=2)
    for step in range(3):
        swav(_views())
        swav.commit_step()
        swav.on_step_end(step)
        assert swav.features_enqueued.item() == (BATCH if step == 2 else 0)


def test_multi_crop_sgd_steps_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    swav = _tiny_swav(small_crops=3, queue_size=8, queue_start_step=0)
    optimizer = torch.optim.SGD(swav.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logs = swav(_views(small_crops=3))
        optimizer.zero_grad()
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(torch.isfinite(value) for value in logs.values())
        assert swav.prototypes.weight.grad is not None
        optimizer.step()
        swav.commit_step()
        swav.on_step_end(step)
    assert swav.queue.dtype == torch.float32 and swav.features_enqueued.item() == 3 * BATCH


def test_state_dict_resumes_identically() -> None:
    options = {"queue_size": 8, "queue_start": 0.2, "freeze_prototypes": 0.25}
    torch.manual_seed(0)
    trained = _tiny_swav(**options)
    trained.horizon_steps = 8  # frozen for steps 0-1, enqueuing from step 2, the queue full after step 3
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for step in range(4):
        _sgd_step(trained, optimizer, step)
    assert {"queue", "features_enqueued", "step", "prototypes.weight"} <= set(trained.state_dict())

    torch.manual_seed(123)  # a fresh process would start from other weights
    resumed = _tiny_swav(**options)
    resumed.load_state_dict(trained.state_dict())
    resumed.horizon_steps = 8  # the trainer sets it before every step
    views = _views()
    loss, logs = trained(views)
    resumed_loss, resumed_logs = resumed(views)
    trained.commit_step()
    resumed.commit_step()

    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)
    assert logs["queue_fill"].item() == 1.0
    for name, value in logs.items():
        torch.testing.assert_close(resumed_logs[name], value, rtol=0, atol=0)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_options_are_typed_keyword_only_hyper_parameters() -> None:
    backbone, feature_dim = build_backbone("convnet", 1)
    swav = SwAV(backbone, feature_dim)
    assert isinstance(swav, Method) and swav.name == "swav" and swav.num_views == 2
    assert (swav.small_crops, swav.small_crop_size, swav.small_crop_scale) == (4, 12, (0.05, 0.4))
    assert swav.queue.shape == (2, 1024, 128) and swav.prototypes.weight.shape == (100, 128)
    assert (swav.freeze_prototypes, swav.queue_start) == (0.05, 0.15)
    options = [p for p in inspect.signature(SwAV).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert len(options) == 13
    assert all(p.annotation in ("int", "float", "bool", "str", "tuple[float, float]") for p in options)


@pytest.mark.parametrize("options", [{"queue_start": 1.5}, {"freeze_prototypes": -0.1}, {"queue_start_step": -1},
                                     {"freeze_prototypes_steps": -1}])
def test_rejects_bad_schedule_options(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"queue_start|freeze_prototypes"):
        _tiny_swav(**options)
