"""DynamicWeightedLoss: hand-computed numbers, classic parity, gradients and edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deforest.training.batch_weights import batch_class_counts, class_weights
from deforest.training.losses import MULTILABEL_ONLY, SCHEMES, DynamicWeightedLoss, EmaOptions

MC, ML = "multiclass", "multilabel"


def test_batch_counts_by_hand():
    y = torch.tensor([0, 2, 2, 2, -100, 1])
    assert batch_class_counts(y, MC, 4).tolist() == [1.0, 1.0, 3.0, 0.0]
    t = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 0]])
    assert batch_class_counts(t, ML, 3).tolist() == [3.0, 1.0, 1.0]


def test_class_weights_by_hand():
    counts = torch.tensor([3.0, 1.0, 0.0])
    assert torch.allclose(class_weights(counts, "inverse_count"), torch.tensor([0.25, 0.5, 1.0]))
    # N / (C_b * n_c), C_b = 2 classes present, N = 4: the samples' weights average 1
    assert torch.allclose(class_weights(counts, "inverse_frequency")[:2], torch.tensor([4 / 6, 4 / 2]))
    # (N - P + 1) / (P + 1) with N = 5 samples
    assert torch.allclose(class_weights(counts, "pos_weight", total=5.0), torch.tensor([3 / 4, 5 / 2, 6.0]))
    beta = 0.9
    raw = torch.tensor([(1 - beta) / (1 - beta**3), (1 - beta) / (1 - beta), (1 - beta) / (1 - beta)])
    expected = raw * 4 / (counts * raw).sum()  # rescaled so the 4 samples' weights average 1
    assert torch.allclose(class_weights(counts, "effective_number", beta=beta), expected)


def test_multiclass_inverse_count_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 0, 2, 1])
    # counts [2, 1, 1, ] -> w = [1/3, 1/2, 1/2]
    ce = [
        -math.log(math.exp(2) / (math.exp(2) + 2)),
        -math.log(1 / (2 + math.e)),
        -math.log(math.exp(3) / (math.exp(3) + 2)),
        -math.log(1 / 3),
    ]
    w = [1 / 3, 1 / 3, 1 / 2, 1 / 2]
    expected = sum(a * b for a, b in zip(ce, w)) / 4
    loss = DynamicWeightedLoss(MC, 3)(logits, y)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_multilabel_inverse_count_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    t = torch.tensor([[1, 0], [1, 1]])
    # positives [2, 1] -> w = [1/3, 1/2]
    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))
    expected = (bce(0, 1) / 3 + bce(2, 0) / 2 + bce(1, 1) / 3 + bce(-1, 1) / 2) / 4
    loss = DynamicWeightedLoss(ML, 2)(logits, t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_classic_formulas_parity(seed):
    g = torch.Generator().manual_seed(seed)
    n, c = 1 + seed * 13, 7
    logits = torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    w = 1.0 / (torch.bincount(y, minlength=c) + 1.0)
    classic = (F.cross_entropy(logits, y, reduction="none") * w[y]).mean()
    assert torch.allclose(DynamicWeightedLoss(MC, c)(logits, y), classic, atol=1e-6)
    t = (torch.rand(n, c, generator=g) > 0.7).float()
    w = 1.0 / (t.sum(0) + 1.0)
    classic = (F.binary_cross_entropy_with_logits(logits, t, reduction="none") * w).mean()
    assert torch.allclose(DynamicWeightedLoss(ML, c)(logits, t), classic, atol=1e-6)


def test_weighted_normalisation_matches_pytorch_weighted_ce():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    w = 1.0 / (torch.bincount(y, minlength=5) + 1.0)
    expected = F.cross_entropy(logits, y, weight=w)
    assert torch.allclose(DynamicWeightedLoss(MC, 5, normalize="weighted")(logits, y), expected, atol=1e-6)


def test_pos_weight_matches_bce_pos_weight():
    g = torch.Generator().manual_seed(4)
    logits, t = torch.randn(12, 4, generator=g), (torch.rand(12, 4, generator=g) > 0.8).float()
    p = t.sum(0)
    pw = (12 - p + 1) / (p + 1)
    expected = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw)
    assert torch.allclose(DynamicWeightedLoss(ML, 4, scheme="pos_weight")(logits, t), expected, atol=1e-6)


def test_focal_reduces_easy_examples():
    logits = torch.tensor([[5.0, 0.0], [0.0, 0.1]])
    y = torch.tensor([0, 0])
    plain = DynamicWeightedLoss(MC, 2, scheme="none", normalize="mean")
    focal = DynamicWeightedLoss(MC, 2, scheme="focal")
    ce = F.cross_entropy(logits, y, reduction="none")
    p = torch.softmax(logits, 1)[:, 0]
    assert torch.allclose(focal(logits, y), (ce * (1 - p) ** 2).mean(), atol=1e-6)
    assert focal(logits, y) < plain(logits, y)


def test_static_weights_use_dataset_counts():
    loss = DynamicWeightedLoss(MC, 3, scheme="static")
    loss.set_static_counts(torch.tensor([80.0, 15.0, 5.0]), total=100)
    weights, _, _ = loss.weights(torch.tensor([0, 0, 1]))
    assert torch.allclose(weights, torch.tensor([100 / 240, 100 / 45, 100 / 15]))


def test_ema_smooths_counts_and_is_a_buffer():
    loss = DynamicWeightedLoss(MC, 2, scheme="ema", ema=EmaOptions(momentum=0.5)).train()
    loss.weights(torch.tensor([0, 0, 0, 1]))  # seeds: counts [3, 1]
    loss.weights(torch.tensor([1, 1, 1, 1]))  # 0.5 * [3, 1] + 0.5 * [0, 4]
    assert loss.ema_counts.tolist() == [1.5, 2.5]
    assert "ema_counts" in loss.state_dict() and "static_counts" in loss.state_dict()
    restored = DynamicWeightedLoss(MC, 2, scheme="ema", ema=EmaOptions(momentum=0.5))
    restored.load_state_dict(loss.state_dict())
    assert restored.ema_counts.tolist() == [1.5, 2.5]


def test_several_heads_share_one_batch_weighting():
    """A list of logits: the mean of the heads' losses, with the weights drawn from the batch once."""
    torch.manual_seed(0)
    targets = torch.tensor([0, 0, 0, 1, 2])
    cnn, stats = torch.randn(5, 3), torch.randn(5, 3)
    plain = DynamicWeightedLoss(MC, 3, scheme="inverse_count")
    both = plain(cnn, targets) / 2 + plain(stats, targets) / 2
    assert torch.allclose(plain([cnn, stats], targets), both)
    ema = DynamicWeightedLoss(MC, 3, scheme="ema").train()
    ema([cnn, stats], targets)
    assert int(ema.ema_steps) == 1


def test_ignore_index_left_out():
    logits = torch.randn(4, 3)
    y = torch.tensor([0, -100, 2, 2])
    loss = DynamicWeightedLoss(MC, 3)(logits, y)
    kept = DynamicWeightedLoss(MC, 3)(logits[[0, 2, 3]], y[[0, 2, 3]])
    assert torch.allclose(loss, kept)


def _cases():
    c = 4
    yield MC, torch.randn(1, c), torch.tensor([2])  # batch of one
    yield MC, torch.randn(6, c), torch.full((6,), 1)  # one class only, others absent
    yield MC, torch.randn(5, c), torch.tensor([0, -100, -100, 3, -100])
    yield ML, torch.randn(1, c), torch.tensor([[0, 1, 0, 0]])
    yield ML, torch.randn(5, c), torch.zeros(5, c, dtype=torch.uint8)  # all-negative rows
    yield ML, torch.randn(5, c), torch.ones(5, c, dtype=torch.bool)  # all positive


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("normalize", ["mean", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_edge_cases_finite_loss_and_gradients(scheme, normalize, smoothing):
    for task, logits, targets in _cases():
        if scheme in MULTILABEL_ONLY and task == MC:
            continue
        logits = logits.clone().requires_grad_(True)
        loss_fn = DynamicWeightedLoss(task, 4, scheme=scheme, normalize=normalize, label_smoothing=smoothing)
        if scheme == "static":
            loss_fn.set_static_counts(torch.tensor([10.0, 0.0, 3.0, 1.0]), 14)
        loss = loss_fn(logits, targets)
        loss.backward()
        assert torch.isfinite(loss), (task, scheme, normalize, targets)
        assert torch.isfinite(logits.grad).all(), (task, scheme, normalize, targets)
        assert loss.requires_grad and loss.grad_fn is not None


def test_pos_weight_rejected_for_multiclass():
    with pytest.raises(ValueError, match="multilabel only"):
        DynamicWeightedLoss(MC, 3, scheme="pos_weight")


def test_custom_criterion_receives_weights():
    seen = {}

    def criterion(logits, targets, weights):
        seen["weights"] = weights
        return (F.cross_entropy(logits, targets, reduction="none") * weights[targets]).sum()

    y = torch.tensor([0, 0, 1])
    DynamicWeightedLoss(MC, 2, criterion=criterion)(torch.randn(3, 2), y)
    assert torch.allclose(seen["weights"], torch.tensor([1 / 3, 1 / 2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scheme in SCHEMES:
            for task in (MC, ML):
                if scheme in MULTILABEL_ONLY and task == MC:
                    continue
                logits = torch.randn(32, 5, device="cuda", requires_grad=True)
                targets = (
                    torch.randint(0, 5, (32,), device="cuda")
                    if task == MC
                    else (torch.rand(32, 5, device="cuda") > 0.7).float()
                )
                loss = DynamicWeightedLoss(task, 5, scheme=scheme).cuda()(logits, targets)
                loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_weighted_loss_is_float32_under_bf16_autocast(task):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 5)
    x = torch.randn(32, 8, generator=g)
    y = torch.randint(0, 5, (32,), generator=g) if task == "multiclass" else (torch.rand(32, 5, generator=g) > 0.6).float()
    loss_fn = DynamicWeightedLoss(task, 5, scheme="inverse_count")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        loss = loss_fn(logits, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected = DynamicWeightedLoss(task, 5, scheme="inverse_count")(logits.detach().float(), y)
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)


# --- multi-label weighting of rare labels: loss optimum, smoothing, loss scale ---------------

ML_SCHEMES = [s for s in SCHEMES if s not in ("auto", "static", "ema")]


def _constant_optimum(
    scheme: str, batch: int, rate: float = 0.02, smoothing: float = 0.0, warmup: int = 3000, seed: int = 0
) -> float:
    """The p at which a constant predictor's weighted loss, in expectation over batches of
    ``batch`` samples of a label in ``rate`` of them, is lowest.

    A constant predictor's batch loss depends only on the batch's positive count P, so the
    expectation is the sum over P = 0..N of the real loss's derivative weighted by the binomial
    probability of P. Every column of the logits is one point of a grid of p with the same
    targets, so one pass scores the grid; the optimum is where the convex sum's slope crosses 0.
    Running state (``logit_adjusted``) is first trained on ``warmup`` sampled batches, then frozen.
    """
    grid = torch.linspace(-7.0, 3.0, 401)
    loss_fn = DynamicWeightedLoss(ML, grid.numel(), scheme=scheme, label_smoothing=smoothing).train()
    g = torch.Generator().manual_seed(seed)
    if scheme == "logit_adjusted":
        with torch.no_grad():
            for _ in range(warmup):
                t = (torch.rand(batch, 1, generator=g) < rate).float().expand(-1, grid.numel())
                loss_fn(torch.zeros(batch, grid.numel()), t)
    loss_fn.eval()
    slope = torch.zeros(grid.numel(), dtype=torch.float64)
    for positives in range(batch + 1):
        probability = math.comb(batch, positives) * rate**positives * (1 - rate) ** (batch - positives)
        if probability < 1e-12:
            continue
        t = (torch.arange(batch) < positives).float()[:, None].expand(-1, grid.numel())
        logits = grid.expand(batch, -1).clone().requires_grad_(True)
        loss_fn(logits, t).backward()
        slope += probability * logits.grad.sum(0).double()
    first_up = int(torch.nonzero(slope > 0)[0])
    z0, z1, s0, s1 = grid[first_up - 1], grid[first_up], slope[first_up - 1], slope[first_up]
    return float(torch.sigmoid(z0 - s0 * (z1 - z0) / (s1 - s0)))


@pytest.mark.parametrize(
    "scheme, batch, expected, tol",
    [
        ("none", 16, 0.0200, 0.0002),
        ("inverse_count", 16, 0.0106, 0.0002),  # the reference formula: about half the true rate
        ("inverse_count", 64, 0.0122, 0.0002),
        ("logit_adjusted", 16, 0.0200, 0.0015),  # balanced weights, optimum kept at the true rate
        ("logit_adjusted", 64, 0.0200, 0.0015),
    ],
)
def test_constant_predictor_optimum_of_a_rare_label(scheme, batch, expected, tol):
    assert _constant_optimum(scheme, batch) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("batch", [16, 64])
def test_balanced_schemes_move_the_optimum_up_not_down(batch):
    """``balanced`` and ``pos_weight`` lift a 2% label's optimum above its rate (the prior
    correction undoes it); ``inverse_count`` is the one that halves it."""
    optima = {s: _constant_optimum(s, batch) for s in ("balanced", "pos_weight", "tolerant", "effective_number")}
    for scheme, p in optima.items():
        assert 0.05 < p < 0.6, (scheme, p)


@pytest.mark.parametrize("scheme", ML_SCHEMES)
def test_smoothing_never_turns_a_weighted_negative_into_a_positive(scheme):
    """N=64, the label absent from the batch, default smoothing 0.1: every element is a
    negative, so the loss must be lowest at a small p (the smoothed target 0.05 at most),
    whatever weight the scheme gives the label's positives."""
    p = _constant_optimum(scheme, 64, rate=0.0, smoothing=0.1)
    if scheme == "tolerant":
        # its negatives' BCE is taken at logit 2z: lowest where sigmoid(2z) is the smoothed target 0.05,
        # p = sigmoid(logit(0.05) / 2), the same as unweighted: the weights move nothing
        assert p == pytest.approx(1 / (1 + math.sqrt(19)), abs=0.002), p
    else:
        assert p < 0.1, p


def _scale(scheme: str, task: str, targets: torch.Tensor, c: int) -> float:
    """The loss of all-zero logits divided by the unweighted one: the mean element weight."""
    logits = torch.zeros(targets.shape[0], c)
    weighted = DynamicWeightedLoss(task, c, scheme=scheme)(logits, targets)
    plain = DynamicWeightedLoss(task, c, scheme="none")(logits, targets)
    return float(weighted / plain)


def _batches(task: str, c: int = 10, n: int = 64):
    g = torch.Generator().manual_seed(7)
    if task == MC:
        all_classes = torch.randint(0, c, (n,), generator=g)
        half = torch.randint(0, c // 2, (n,), generator=g)
    else:
        all_classes = (torch.rand(n, c, generator=g) < 0.3).long()
        half = all_classes.clone()
        half[:, c // 2 :] = 0
    return all_classes, half


@pytest.mark.parametrize(
    "task, scheme",
    [(MC, s) for s in ("inverse_frequency", "effective_number")]
    + [(ML, s) for s in ("inverse_frequency", "effective_number", "pos_weight", "tolerant", "balanced", "logit_adjusted")],
)
def test_loss_scale_stays_within_2x_when_half_the_classes_are_absent(task, scheme):
    all_classes, half = _batches(task)
    ratio = _scale(scheme, task, all_classes, 10) / _scale(scheme, task, half, 10)
    assert 0.5 <= ratio <= 2.0, ratio


def test_auto_scheme_resolves_by_task_from_the_real_config():
    """``loss.scheme=auto`` (the shipped default): inverse_count for a multi-class head, the
    config's ``loss.multilabel_scheme`` for a multi-label head."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "loss" / "default.yaml")
    options = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "criterion"}
    assert options["scheme"] == "auto"
    assert DynamicWeightedLoss.from_keys(MC, 3, **options).scheme == "inverse_count"
    assert DynamicWeightedLoss.from_keys(ML, 3, **options).scheme == options["multilabel_scheme"]
    assert DynamicWeightedLoss.from_keys(ML, 3, **{**options, "multilabel_scheme": "balanced"}).scheme == "balanced"
    assert DynamicWeightedLoss.from_keys(MC, 3, **{**options, "multilabel_scheme": "balanced"}).scheme == "inverse_count"
    with pytest.raises(ValueError, match="multilabel only"):
        DynamicWeightedLoss(MC, 3, scheme="balanced")


@pytest.mark.parametrize("scheme", ["pos_weight", "balanced"])
def test_multilabel_only_scheme_on_multiclass_data_is_a_config_error(train_config, scheme):
    """Refused in one line naming the key once the real EuroSAT sample shows a multi-class task."""
    from deforest.core.errors import ConfigError
    from deforest.runs.build import build_datamodule, build_model

    cfg = train_config([f"loss.scheme={scheme}"])
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    with pytest.raises(ConfigError, match=rf"loss\.scheme={scheme} .* needs a multi-label task; this data is multiclass"):
        build_model(cfg.model, cfg.loss, datamodule)


def test_negative_tolerance_reshapes_only_the_negative_terms():
    """``negative_scale`` (lambda): a negative's BCE is softplus(lambda z) / lambda, a positive's stays
    -log sigmoid(z); an easy negative (z = -3) pulls 19x less at lambda = 2, a wrong one (z = 3) about as much."""
    logits = torch.tensor([[-3.0, 3.0, -3.0, 3.0]], requires_grad=True)
    targets = torch.tensor([[0, 0, 1, 1]])
    plain = DynamicWeightedLoss(ML, 4, scheme="none", normalize="mean")
    tolerant = DynamicWeightedLoss(ML, 4, scheme="none", normalize="mean", negative_scale=2.0)
    (grad_plain,) = torch.autograd.grad(plain(logits, targets), logits)
    (grad_tolerant,) = torch.autograd.grad(tolerant(logits, targets), logits)
    value = tolerant(logits, targets).item() * 4
    expected = F.softplus(torch.tensor(-6.0)) / 2 + F.softplus(torch.tensor(6.0)) / 2 + F.softplus(torch.tensor(3.0)) + F.softplus(torch.tensor(-3.0))
    assert value == pytest.approx(expected.item(), rel=1e-6)
    ratio = grad_plain[0] / grad_tolerant[0]
    assert ratio[0].item() == pytest.approx(math.exp(3) * (1 + math.exp(-6)) / (1 + math.exp(-3)), rel=1e-5)  # ~19
    assert ratio[1].item() == pytest.approx(0.955, abs=0.002)
    assert torch.equal(grad_plain[0, 2:], grad_tolerant[0, 2:])  # positives untouched


def test_negative_scale_one_is_plain_and_bad_values_are_refused():
    logits, targets = torch.randn(16, 5), (torch.rand(16, 5) < 0.3).long()
    base = DynamicWeightedLoss(ML, 5, scheme="pos_weight", label_smoothing=0.1)
    same = DynamicWeightedLoss(ML, 5, scheme="pos_weight", label_smoothing=0.1, negative_scale=1.0)
    assert torch.equal(base(logits, targets), same(logits, targets))
    with pytest.raises(ValueError, match="negative_scale must be > 0"):
        DynamicWeightedLoss(ML, 5, negative_scale=0.0)
    with pytest.raises(ValueError, match="both reshape the negative term"):
        DynamicWeightedLoss(ML, 5, scheme="asymmetric", negative_scale=2.0)
