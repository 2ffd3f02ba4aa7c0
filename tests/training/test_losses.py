"""ConfKD loss terms against analytic values, and the combined objective's wiring."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from confkd.config import LossConfig
from confkd.errors import ConfigError, DatasetError, GeometryError
from confkd.training import losses
from confkd.training.losses import (
    ConfKDLoss,
    confidence_from_probabilities,
    confkd_objective,
    cross_entropy,
    entropy,
    entropy_map,
    kl_distillation,
    partial_cross_entropy,
    pseudo_mask_cross_entropy,
)
from confkd.training.network import BranchOutputs, DualBranchUNet

IGNORE = 255
LN = math.log


def logits_of(*probs: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A ``[1, C]`` logit vector whose softmax is ``probs``."""
    return torch.tensor([[LN(p) for p in probs]], dtype=dtype)


# ---------------------------------------------------------------------------------------- cross-entropy
def test_cross_entropy_hand_value() -> None:
    # p = softmax(0, ln 3) = (1/4, 3/4); target 1 -> -ln(3/4)
    logits = torch.tensor([[0.0, LN(3)]], dtype=torch.float64)
    loss = cross_entropy(logits, torch.tensor([1]))
    torch.testing.assert_close(loss, torch.tensor(LN(4 / 3), dtype=torch.float64))


def test_cross_entropy_is_the_mean_over_voxels_and_respects_ignore_index() -> None:
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target))
    target[0, 0] = IGNORE
    torch.testing.assert_close(
        cross_entropy(logits, target, ignore_index=IGNORE), F.cross_entropy(logits, target, ignore_index=IGNORE)
    )


def test_cross_entropy_accepts_narrow_integer_labels() -> None:
    logits = torch.randn(1, 3, 4)
    target = torch.tensor([[0, 1, 2, 1]])
    assert cross_entropy(logits, target.to(torch.uint8)) == cross_entropy(logits, target)


def test_partial_cross_entropy_equals_ce_on_the_annotated_subset() -> None:
    logits = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    sparse = torch.full((2, 6, 7), IGNORE)
    sparse[0, 1, 2], sparse[0, 3, 3], sparse[1, 5, 6] = 0, 3, 2
    loss = partial_cross_entropy(logits, sparse, IGNORE)
    log_p = torch.log_softmax(logits, dim=1)
    by_hand = -(log_p[0, 0, 1, 2] + log_p[0, 3, 3, 3] + log_p[1, 2, 5, 6]) / 3
    torch.testing.assert_close(loss, by_hand)


def test_partial_cross_entropy_ignores_unannotated_logits() -> None:
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    sparse = torch.full((1, 8, 8), IGNORE)
    sparse[0, :2, :2] = 1
    loss = partial_cross_entropy(logits, sparse, IGNORE)
    loss.backward()
    assert logits.grad is not None
    unannotated = (sparse == IGNORE).unsqueeze(1).expand_as(logits)
    assert (logits.grad[unannotated] == 0).all()
    assert (logits.grad[~unannotated] != 0).any()
    changed = logits.detach().clone()
    changed[unannotated] = 1e4 * torch.randn(int(unannotated.sum()))
    assert partial_cross_entropy(changed, sparse, IGNORE) == loss.detach()


def test_partial_cross_entropy_without_annotation_is_exactly_zero_with_zero_grads() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    sparse = torch.full((2, 4, 4), IGNORE)
    loss = partial_cross_entropy(logits, sparse, IGNORE)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_out_of_range_labels_raise_a_readable_error() -> None:
    logits = torch.randn(1, 3, 4)
    with pytest.raises(DatasetError, match=r"label value 5 is outside \[0, 3\).*num_classes=3"):
        partial_cross_entropy(logits, torch.tensor([[0, 5, IGNORE, 1]]), IGNORE)
    with pytest.raises(DatasetError, match="label value -1"):
        cross_entropy(logits, torch.tensor([[0, -1, 1, 1]]))
    # out-of-range values outside the mask are never read
    masked_out = torch.tensor([[False]])
    assert cross_entropy(logits, torch.tensor([[0, 9, 1, 1]]), mask=masked_out).item() == 0.0


def test_shape_and_dtype_errors() -> None:
    with pytest.raises(GeometryError, match=r"\[N, \*spatial\]"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="bool"):
        entropy(torch.randn(2, 3, 4), mask=torch.ones(2, 4))
    with pytest.raises(GeometryError, match="does not broadcast"):
        entropy(torch.randn(2, 3, 4), mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(GeometryError, match="does not broadcast"):
        entropy(torch.randn(2, 3, 4), mask=torch.ones(2, 4, 1, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------- KL
def test_kl_of_identical_logits_is_zero_and_positive_otherwise() -> None:
    a = torch.randn(2, 4, 5, 5)
    assert kl_distillation(a, a.clone()).abs() < 1e-6
    assert kl_distillation(a, torch.randn(2, 4, 5, 5)) > 0


def test_kl_hand_value() -> None:
    # KL((0.8, 0.2) || (0.5, 0.5)) = 0.8 ln 1.6 + 0.2 ln 0.4
    teacher, student = logits_of(0.8, 0.2), torch.zeros(1, 2, dtype=torch.float64)
    expected = 0.8 * LN(1.6) + 0.2 * LN(0.4)
    assert expected == pytest.approx(0.19274, abs=1e-5)
    torch.testing.assert_close(kl_distillation(student, teacher), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_kl_temperature_softens_then_rescales_by_t_squared(temperature: float) -> None:
    teacher = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    student = torch.tensor([[0.0, 1.0, -0.5]], dtype=torch.float64)

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v / temperature) for v in z]
        return [v / sum(e) for v in e]

    p_t, p_s = softmax(teacher[0].tolist()), softmax(student[0].tolist())
    by_hand = temperature**2 * sum(t * (LN(t) - LN(s)) for t, s in zip(p_t, p_s, strict=True))
    got = kl_distillation(student, teacher, temperature=temperature)
    torch.testing.assert_close(got, torch.tensor(by_hand, dtype=torch.float64))
    # and it is not just T^2 times the T=1 value
    assert not math.isclose(got.item(), temperature**2 * kl_distillation(student, teacher).item())


def test_kl_sends_no_gradient_to_the_teacher() -> None:
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    kl_distillation(student, teacher, temperature=2.0).backward()
    assert teacher.grad is None or torch.equal(teacher.grad, torch.zeros_like(teacher))
    assert student.grad is not None
    assert student.grad.abs().sum() > 0


def test_kl_mask_selects_voxels() -> None:
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True], [False]])
    torch.testing.assert_close(kl_distillation(student, teacher, mask=mask), kl_distillation(student[:1], teacher[:1]))
    assert kl_distillation(student, teacher, mask=torch.zeros(2, 1, dtype=torch.bool)).item() == 0.0


def test_kl_with_saturated_teacher_is_finite() -> None:
    student = torch.zeros(1, 3, 2, requires_grad=True)
    teacher = torch.tensor([[[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]]])
    loss = kl_distillation(student, teacher)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(LN(3)))  # KL(one-hot || uniform) = ln C
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


def test_bad_temperature_raises() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        kl_distillation(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)


# -------------------------------------------------------------------------------------------- entropy
@pytest.mark.parametrize("num_classes", [2, 3, 4, 7])
def test_entropy_of_uniform_logits_is_log_c(num_classes: int) -> None:
    for value in (0.0, 5.0):
        # exact in float64: softmax's shift makes the logits all zero, so H = logsumexp(0) = ln C
        exact = entropy_map(torch.full((2, num_classes, 3, 5), value, dtype=torch.float64))
        assert torch.equal(exact, torch.full((2, 3, 5), LN(num_classes), dtype=torch.float64))
        logits = torch.full((2, num_classes, 3, 5), value)
        torch.testing.assert_close(entropy(logits), torch.tensor(LN(num_classes)))
        torch.testing.assert_close(entropy(logits, normalize=True), torch.tensor(1.0))


def test_entropy_hand_value() -> None:
    # H(0.8, 0.2) = -(0.8 ln 0.8 + 0.2 ln 0.2)
    expected = -(0.8 * LN(0.8) + 0.2 * LN(0.2))
    torch.testing.assert_close(entropy(logits_of(0.8, 0.2)), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(
        entropy(logits_of(0.8, 0.2), normalize=True), torch.tensor(expected / LN(2), dtype=torch.float64)
    )


def test_entropy_of_confident_logits_is_zero_with_finite_gradient() -> None:
    logits = torch.tensor([[[1e4, 30.0], [-1e4, 0.0], [0.0, -30.0]]], requires_grad=True)
    h = entropy(logits)
    h.backward()
    assert 0.0 <= h.item() < 1e-9
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_entropy_mask_and_empty_selection() -> None:
    logits = torch.stack([torch.zeros(3, 4), torch.tensor([[50.0] * 4, [0.0] * 4, [0.0] * 4])])
    keep_first = torch.tensor([True, False]).reshape(2, 1)
    torch.testing.assert_close(entropy(logits, mask=keep_first), torch.tensor(LN(3)))
    empty = entropy(logits.requires_grad_(), mask=torch.zeros(2, 1, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()


def test_entropy_gradient_lowers_entropy() -> None:
    logits = torch.randn(1, 4, 6, requires_grad=True)
    before = entropy(logits)
    before.backward()
    assert logits.grad is not None
    after = entropy(logits.detach() - 0.5 * logits.grad)
    assert after < before


def test_confidence_of_uniform_is_zero_and_of_one_hot_is_one() -> None:
    uniform = torch.full((2, 3, 4, 4), 1 / 3)
    torch.testing.assert_close(confidence_from_probabilities(uniform), torch.zeros(2, 4, 4), atol=1e-6, rtol=0)
    one_hot = F.one_hot(torch.randint(0, 3, (2, 4, 4)), 3).movedim(-1, 1).float()
    assert torch.equal(confidence_from_probabilities(one_hot), torch.ones(2, 4, 4))
    # [C, *spatial] with class_dim=0
    half = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    torch.testing.assert_close(confidence_from_probabilities(half, class_dim=0), torch.tensor([0.0, 1.0]))


def test_confidence_is_one_minus_normalised_entropy() -> None:
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    conf = confidence_from_probabilities(torch.softmax(logits, dim=1))
    torch.testing.assert_close(conf, 1 - entropy_map(logits, normalize=True))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_classes=st.integers(2, 6), scale=st.floats(0.01, 100.0))
def test_entropy_and_kl_stay_in_their_ranges(seed: int, num_classes: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(2, num_classes, 5, generator=gen)
    b = scale * torch.randn(2, num_classes, 5, generator=gen)
    h = entropy_map(a, normalize=True)
    assert (h >= -1e-6).all()
    assert (h <= 1 + 1e-6).all()
    assert kl_distillation(a, b) >= -1e-6
    conf = confidence_from_probabilities(torch.softmax(a, dim=1))
    assert (conf >= 0).all()
    assert (conf <= 1).all()


# ------------------------------------------------------------------------------------------- pseudo-mask
def test_pseudo_mask_ce_hand_value_and_threshold() -> None:
    # voxel 0: p = (0.9, 0.1), voxel 1: p = (0.4, 0.6); the pseudo labels are 0 and 1
    logits = torch.tensor([[[LN(0.9), LN(0.4)], [LN(0.1), LN(0.6)]]], dtype=torch.float64)
    both = (-LN(0.9) - LN(0.6)) / 2
    torch.testing.assert_close(pseudo_mask_cross_entropy(logits), torch.tensor(both, dtype=torch.float64))
    torch.testing.assert_close(
        pseudo_mask_cross_entropy(logits, threshold=0.7), torch.tensor(-LN(0.9), dtype=torch.float64)
    )
    assert pseudo_mask_cross_entropy(logits, threshold=0.95).item() == 0.0


def test_pseudo_mask_ce_targets_are_detached() -> None:
    logits = torch.randn(1, 3, 5, requires_grad=True)
    pseudo_mask_cross_entropy(logits).backward()
    # gradient of -log p_argmax: p - one_hot(argmax), i.e. negative only at the argmax class
    p = torch.softmax(logits.detach(), dim=1)
    expected = (p - F.one_hot(p.argmax(1), 3).movedim(-1, 1)) / 5
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, expected)


# ---------------------------------------------------------------------------------------- the objective
ONLY: dict[str, dict[str, Any]] = {
    "strong_ce": {"lambda_strong": 1.0},
    "weak_pce": {"lambda_weak": 1.0},
    "kl": {"lambda_kl": 1.0},
    "entropy": {"lambda_ent": 1.0},
    "pseudo_ce": {"lambda_pseudo": 1.0},
    "student_strong_ce": {"student_strong": True},
}
ALL_OFF = {"lambda_strong": 0.0, "lambda_weak": 0.0, "lambda_kl": 0.0, "lambda_ent": 0.0, "lambda_pseudo": 0.0}


def only(term: str, **extra: Any) -> LossConfig:
    return LossConfig(**{**ALL_OFF, **ONLY[term], **extra})


def make_batch(n_strong: int = 2, n_weak: int = 2, num_classes: int = 3, size: tuple[int, int] = (4, 5)):
    n = n_strong + n_weak
    torch.manual_seed(1)
    outputs = BranchOutputs(
        student=torch.randn(n, num_classes, *size, dtype=torch.float64, requires_grad=True),
        teacher=torch.randn(n, num_classes, *size, dtype=torch.float64, requires_grad=True),
    )
    is_strong = torch.tensor([True] * n_strong + [False] * n_weak)
    dense = torch.randint(0, num_classes, (n, *size))
    dense[~is_strong] = 99  # garbage where it must not be read
    sparse = torch.full((n, *size), IGNORE)
    sparse[~is_strong, 0, :] = 1
    sparse[~is_strong, 2, 1] = 2
    sparse[is_strong] = 77  # garbage where it must not be read
    return outputs, is_strong, dense, sparse


def test_objective_total_is_the_weighted_sum_of_hand_computed_terms() -> None:
    outputs, is_strong, dense, sparse = make_batch()
    cfg = LossConfig(
        lambda_strong=2.0, lambda_weak=0.5, lambda_kl=3.0, lambda_ent=0.1, lambda_pseudo=0.7, temperature=2.0,
        kl_on="weak", entropy_on="all", student_strong=True,
    )  # fmt: skip
    result = confkd_objective(outputs, is_strong, dense, sparse, cfg, IGNORE)
    s, t = outputs.student.detach(), outputs.teacher.detach()
    st_, wk = is_strong, ~is_strong
    expected = {
        "strong_ce": F.cross_entropy(t[st_], dense[st_]),
        "weak_pce": F.cross_entropy(s[wk], sparse[wk], ignore_index=IGNORE),
        "kl": 4.0
        * F.kl_div(F.log_softmax(s[wk] / 2, 1), F.log_softmax(t[wk] / 2, 1), log_target=True, reduction="none")
        .sum(1)
        .mean(),
        "entropy": -(F.softmax(s, 1) * F.log_softmax(s, 1)).sum(1).mean(),
        "pseudo_ce": F.cross_entropy(s, s.argmax(1)),
        "student_strong_ce": F.cross_entropy(s[st_], dense[st_]),
    }
    assert result.terms.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(result.terms[name], value, msg=name)
        assert not result.terms[name].requires_grad
    weights = {"strong_ce": 2.0, "weak_pce": 0.5, "kl": 3.0, "entropy": 0.1, "pseudo_ce": 0.7, "student_strong_ce": 1}
    torch.testing.assert_close(result.total, sum(weights[k] * v for k, v in expected.items()))


@pytest.mark.parametrize("term", list(ONLY))
def test_each_term_responds_only_to_its_own_inputs(term: str) -> None:
    outputs, is_strong, dense, sparse = make_batch()
    cfg = only(term, kl_on="all", entropy_on="weak")
    base = confkd_objective(outputs, is_strong, dense, sparse, cfg, IGNORE)
    assert set(base.terms) == {term}
    assert base.total > 0
    reads = {
        "strong_ce": {"teacher", "dense"},
        "weak_pce": {"student", "sparse"},
        "kl": {"student", "teacher"},
        "entropy": {"student"},
        "pseudo_ce": {"student"},
        "student_strong_ce": {"student", "dense"},
    }[term]
    perturbed = {
        "student": (outputs._replace(student=outputs.student + torch.randn_like(outputs.student)), dense, sparse),
        "teacher": (outputs._replace(teacher=outputs.teacher + torch.randn_like(outputs.teacher)), dense, sparse),
        "dense": (outputs, torch.where(is_strong[:, None, None], (dense + 1) % 3, dense), sparse),
        "sparse": (outputs, dense, torch.where(sparse == 1, 2, sparse)),
    }
    for name, (o, d, sp) in perturbed.items():
        changed = confkd_objective(o, is_strong, d, sp, cfg, IGNORE).total
        if name in reads:
            assert not torch.equal(changed, base.total), f"{term} ignores {name}"
        else:
            assert torch.equal(changed, base.total), f"{term} reads {name}"


def test_coverage_selects_rows() -> None:
    outputs, is_strong, dense, sparse = make_batch()
    s, t = outputs.student.detach(), outputs.teacher.detach()
    for coverage, rows in (("strong", is_strong), ("weak", ~is_strong), ("all", torch.ones(4, dtype=torch.bool))):
        kl = confkd_objective(outputs, is_strong, dense, sparse, only("kl", kl_on=coverage), IGNORE).terms["kl"]
        torch.testing.assert_close(kl, kl_distillation(s[rows], t[rows]))
        cfg = only("entropy", entropy_on=coverage, entropy_normalize=True)
        ent = confkd_objective(outputs, is_strong, dense, sparse, cfg, IGNORE).terms["entropy"]
        torch.testing.assert_close(ent, entropy(s[rows], normalize=True))


def test_zero_weight_terms_are_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a zero-weight term was computed")

    for name in ("kl_distillation", "entropy", "pseudo_mask_cross_entropy"):
        monkeypatch.setattr(losses, name, boom)
    outputs, is_strong, dense, sparse = make_batch()
    cfg = LossConfig(lambda_kl=0.0, lambda_ent=0.0, lambda_pseudo=0.0)
    result = confkd_objective(outputs, is_strong, dense, sparse, cfg, IGNORE)
    assert set(result.terms) == {"strong_ce", "weak_pce"}


@pytest.mark.parametrize(("n_strong", "n_weak"), [(0, 3), (3, 0)])
def test_batches_without_strong_or_weak_images(n_strong: int, n_weak: int) -> None:
    outputs, is_strong, dense, sparse = make_batch(n_strong, n_weak)
    cfg = LossConfig(kl_on="strong", entropy_on="weak", student_strong=True, lambda_pseudo=1.0)
    result = confkd_objective(outputs, is_strong, dense, sparse, cfg, IGNORE)
    missing = ("strong_ce", "kl", "student_strong_ce") if n_strong == 0 else ("weak_pce", "entropy", "pseudo_ce")
    for name in missing:
        assert result.terms[name].item() == 0.0, name
    result.total.backward()
    for logits in outputs:
        assert logits.grad is not None
        assert torch.isfinite(logits.grad).all()


def test_all_weights_zero_still_backpropagates() -> None:
    outputs, is_strong, dense, sparse = make_batch()
    result = confkd_objective(outputs, is_strong, dense, sparse, LossConfig(**ALL_OFF), IGNORE)
    assert result.terms == {}
    assert result.total.item() == 0.0
    result.total.backward()


def test_kl_term_sends_no_gradient_to_the_teacher_decoder() -> None:
    torch.manual_seed(0)
    model = DualBranchUNet(1, 3, width=4, depth=2)
    x = torch.randn(2, 1, 8, 12)
    is_strong = torch.tensor([True, False])
    labels = torch.zeros(2, 8, 12, dtype=torch.long)
    result = confkd_objective(model(x), is_strong, labels, labels, only("kl"), IGNORE)
    result.total.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_confkd_loss_module_matches_the_function() -> None:
    outputs, is_strong, dense, sparse = make_batch()
    cfg = LossConfig(lambda_pseudo=0.3, temperature=3.0)
    module = ConfKDLoss(cfg, IGNORE)
    torch.testing.assert_close(
        module(outputs, is_strong, dense, sparse).total,
        confkd_objective(outputs, is_strong, dense, sparse, cfg, IGNORE).total,
    )


def test_is_strong_must_be_a_bool_row_vector() -> None:
    outputs, _, dense, sparse = make_batch()
    with pytest.raises(GeometryError, match="is_strong"):
        confkd_objective(outputs, torch.tensor([1, 1, 0, 0]), dense, sparse, LossConfig(), IGNORE)


def test_half_precision_logits_are_upcast() -> None:
    logits = torch.zeros(1, 4, 3, dtype=torch.bfloat16)
    assert entropy(logits).dtype == torch.float32
    torch.testing.assert_close(entropy(logits), torch.tensor(LN(4)))
