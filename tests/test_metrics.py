"""Segmentation metrics: analytic values, the conventions, and HD95 against a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import cdist

from confkd.errors import GeometryError
from confkd.metrics import CaseMetrics, SummaryStat, dice, evaluate_case, hd95, summarize, surface_distances


# ---------------------------------------------------------------------------------------------- references
def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (outside the array counts as outside); no scipy."""
    padded = np.pad(mask.astype(bool), 1)
    interior = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_inside = np.ones(mask.shape, dtype=bool)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            all_inside &= np.roll(padded, shift, axis=axis)[interior]
    return mask.astype(bool) & ~all_inside


def brute_directed(pm: np.ndarray, gm: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Both directed surface distance sets by all pairwise distances between surface voxel centres (mm)."""
    ps = np.argwhere(brute_surface(pm)) * np.asarray(spacing)
    gs = np.argwhere(brute_surface(gm)) * np.asarray(spacing)
    d = cdist(ps, gs)
    return d.min(axis=1), d.min(axis=0)


def brute_hd95(pm: np.ndarray, gm: np.ndarray, spacing) -> float:
    if not pm.any() and not gm.any():
        return 0.0
    if pm.any() != gm.any():
        return math.nan
    return float(np.percentile(np.concatenate(brute_directed(pm, gm, spacing)), 95))


def cube(shape, start, size=10) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    out[tuple(slice(s, s + size) for s in start)] = 1
    return out


# ---------------------------------------------------------------------------------------------- Dice
def test_dice_of_two_squares_overlapping_by_half_is_one_half() -> None:
    pred = np.zeros((20, 20), dtype=np.uint8)
    gt = np.zeros((20, 20), dtype=np.uint8)
    pred[0:10, 0:10] = 1
    gt[0:10, 5:15] = 1  # 50 shared pixels, 100 + 100 in total
    assert dice(pred, gt, 1) == pytest.approx(0.5)


def test_dice_counts_only_the_requested_label() -> None:
    pred = np.array([[1, 1, 2, 2]])
    gt = np.array([[1, 2, 2, 2]])
    assert dice(pred, gt, 1) == pytest.approx(2 * 1 / (2 + 1))
    assert dice(pred, gt, 2) == pytest.approx(2 * 2 / (2 + 3))


def test_identical_masks_give_dice_one_and_hd95_zero() -> None:
    gt = cube((16, 16, 16), (3, 2, 4))
    assert dice(gt, gt.copy(), 1) == 1.0
    assert hd95(gt, gt.copy(), 1, (1.0, 2.0, 3.0)) == 0.0


# ---------------------------------------------------------------------------------------------- HD95
def test_hd95_of_a_cube_shifted_three_voxels_with_2_5_mm_spacing_is_7_5_mm() -> None:
    # two 10^3 cubes, the second shifted by 3 voxels along i (2.5 mm): each surface has 10^3 - 8^3 = 488 voxels.
    # The 100 voxels of the pred's i=0 face are 3 * 2.5 = 7.5 mm from the gt's i=3 face, and symmetrically the
    # gt's far face; every other surface voxel is closer (the side faces overlap; the pred's i=9 face lies at
    # most 4 mm from a gt side face). So 200 of 976 distances equal the maximum, 7.5 mm, which is therefore also
    # the 95th percentile (and the Hausdorff distance).
    spacing = (2.5, 1.0, 1.0)
    pred = cube((20, 14, 14), (2, 2, 2))
    gt = cube((20, 14, 14), (5, 2, 2))
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    assert d_pg.size == d_gp.size == 488
    both = np.concatenate([d_pg, d_gp])
    assert np.count_nonzero(both == 7.5) == 200
    assert both.max() == 7.5
    assert hd95(pred, gt, 1, spacing) == pytest.approx(7.5)


def test_the_same_voxel_shift_along_another_axis_gives_other_millimetres() -> None:
    spacing = (2.5, 1.0, 1.0)
    pred = cube((20, 20, 20), (2, 2, 2))
    along_i = cube((20, 20, 20), (5, 2, 2))
    along_j = cube((20, 20, 20), (2, 5, 2))
    assert hd95(pred, along_i, 1, spacing) == pytest.approx(7.5)
    assert hd95(pred, along_j, 1, spacing) == pytest.approx(3.0)  # same argument, 3 voxels * 1 mm


def test_cube_touching_the_array_border_has_a_surface_there() -> None:
    # the cube fills the array along i, so its i=0 and i=9 faces lie on the border: they are surface all the same
    # (all six faces: 10^3 - 8^3 = 488 voxels; were the border inside, the two 8x8 face interiors would drop out)
    pred = cube((10, 14, 14), (0, 2, 2))
    gt = cube((10, 14, 14), (0, 2, 2))
    gt[:, 2:12, 11] = 1  # one voxel thicker along k
    assert surface_distances(pred, pred, (1.0, 1.0, 1.0))[0].size == 10**3 - 8**3
    assert hd95(pred, gt, 1, (1.0, 1.0, 1.0)) == pytest.approx(brute_hd95(pred == 1, gt == 1, (1.0, 1.0, 1.0)))


def test_hd95_is_the_percentile_of_the_union_of_both_directions_medpy_not_monai() -> None:
    # a single row: every pixel is surface (its neighbours across the row are outside the array).
    # gt = {0}, pred = {0, 10} with 0.5 mm columns: pred->gt distances [0, 5], gt->pred [0].
    # Union [0, 0, 5]: 95th percentile at rank 0.95 * 2 = 1.9 -> 0 + 0.9 * 5 = 4.5 mm (MedPy's hd95).
    # MONAI's max of directed percentiles would be max(0 + 0.95 * 5, 0) = 4.75 mm.
    gt = np.zeros((1, 12), dtype=np.uint8)
    pred = np.zeros((1, 12), dtype=np.uint8)
    gt[0, 0] = 1
    pred[0, [0, 10]] = 1
    d_pg, d_gp = surface_distances(pred, gt, (1.0, 0.5))
    np.testing.assert_allclose(d_pg, [0.0, 5.0])
    np.testing.assert_allclose(d_gp, [0.0])
    assert hd95(pred, gt, 1, (1.0, 0.5)) == pytest.approx(4.5)
    assert hd95(gt, pred, 1, (1.0, 0.5)) == pytest.approx(4.5)  # symmetric


def test_surface_uses_face_connectivity() -> None:
    # a 5x5 square without its corner (0, 0): pixel (1, 1) touches the background only diagonally, so it is
    # interior with face connectivity (15 surface pixels) and would be surface with full connectivity (16)
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    mask[1, 1] = False
    d, _ = surface_distances(mask, mask, (1.0, 1.0))
    assert d.size == 15
    assert not np.any(d)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hd95_equals_brute_force_on_random_masks(data: st.DataObject) -> None:
    ndim = data.draw(st.sampled_from([2, 3]), label="ndim")
    shape = data.draw(st.tuples(*[st.integers(1, 9 if ndim == 2 else 6)] * ndim), label="shape")
    pm = data.draw(hnp.arrays(np.bool_, shape), label="pred")
    gm = data.draw(hnp.arrays(np.bool_, shape), label="gt")
    spacing = data.draw(st.tuples(*[st.floats(0.25, 4.0)] * ndim), label="spacing")
    expected = brute_hd95(pm, gm, spacing)
    got = hd95(pm.astype(np.uint8), gm.astype(np.uint8), 1, spacing)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    if pm.any() and gm.any():  # the directed sets themselves, voxel by voxel, in C order
        ours = surface_distances(pm, gm, spacing)
        ref = brute_directed(pm, gm, spacing)
        np.testing.assert_allclose(ours[0], ref[0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ours[1], ref[1], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- conventions
def test_both_empty_gives_dice_one_and_hd95_zero() -> None:
    empty = np.zeros((5, 5, 5), dtype=np.uint8)
    assert dice(empty, empty, 1) == 1.0
    assert hd95(empty, empty, 1, (1.0, 1.0, 1.0)) == 0.0
    d_pg, d_gp = surface_distances(empty, empty, (1.0, 1.0, 1.0))
    assert d_pg.size == d_gp.size == 0


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_exactly_one_empty_gives_dice_zero_and_hd95_nan(empty_side: str) -> None:
    full = cube((8, 8, 8), (2, 2, 2), size=3)
    empty = np.zeros_like(full)
    pred, gt = (empty, full) if empty_side == "pred" else (full, empty)
    assert dice(pred, gt, 1) == 0.0
    assert math.isnan(hd95(pred, gt, 1, (1.0, 1.0, 1.0)))
    d_pg, d_gp = surface_distances(pred, gt, (1.0, 1.0, 1.0))
    nonempty = d_gp if empty_side == "pred" else d_pg
    assert (d_pg.size if empty_side == "pred" else d_gp.size) == 0
    assert nonempty.size == 26 and np.all(np.isinf(nonempty))


def test_shape_mismatch_is_a_geometry_error_naming_both_shapes() -> None:
    a = np.zeros((4, 5, 6), dtype=np.uint8)
    b = np.zeros((4, 5, 7), dtype=np.uint8)
    for call in (
        lambda: dice(a, b, 1),
        lambda: hd95(a, b, 1, (1.0, 1.0, 1.0)),
        lambda: surface_distances(a, b, (1.0, 1.0, 1.0)),
        lambda: evaluate_case(a, b, [1], (1.0, 1.0, 1.0)),
    ):
        with pytest.raises(GeometryError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
            call()


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)])
def test_bad_spacing_is_a_geometry_error(spacing) -> None:
    a = cube((6, 6, 6), (1, 1, 1), size=2)
    with pytest.raises(GeometryError, match="spacing"):
        hd95(a, a, 1, spacing)


# ---------------------------------------------------------------------------------------------- per case
def _random_label_maps(seed: int, shape=(24, 20, 6), n_classes=3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    for c in range(1, n_classes + 1):
        for target in (gt, pred):
            lo = rng.integers(0, np.array(shape) // 2)
            hi = lo + rng.integers(1, np.array(shape) // 2 + 1)
            target[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = c
    return pred, gt


@pytest.mark.parametrize("seed", range(5))
def test_evaluate_case_matches_the_per_class_functions(seed: int) -> None:
    pred, gt = _random_label_maps(seed)
    spacing = (1.25, 0.8, 5.0)
    labels = [1, 2, 3, 7]  # 7 is in neither map: Dice 1, HD95 0
    metrics = evaluate_case(pred, gt, labels, spacing)
    assert list(metrics.dice) == labels == list(metrics.hd95)
    for c in labels:
        assert metrics.dice[c] == dice(pred, gt, c)
        expected = brute_hd95(pred == c, gt == c, spacing)
        assert metrics.hd95[c] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics.dice[7] == 1.0 and metrics.hd95[7] == 0.0


def test_evaluate_case_with_background_as_a_class_does_not_crop_it_away() -> None:
    pred, gt = _random_label_maps(0)
    metrics = evaluate_case(pred, gt, [0, 1], (1.0, 1.0, 1.0))
    assert metrics.dice[0] == dice(pred, gt, 0)
    assert metrics.hd95[0] == pytest.approx(brute_hd95(pred == 0, gt == 0, (1.0, 1.0, 1.0)))


def test_evaluate_case_on_empty_maps() -> None:
    empty = np.zeros((4, 4, 4), dtype=np.uint8)
    assert evaluate_case(empty, empty, [1, 2], (1.0, 1.0, 1.0)) == CaseMetrics({1: 1.0, 2: 1.0}, {1: 0.0, 2: 0.0})


def test_to_row_names_and_column_order() -> None:
    m = CaseMetrics({1: 0.5, 2: 1.0}, {1: 4.0, 2: math.nan})
    row = m.to_row({1: "RV", 2: "MYO"})
    assert list(row) == ["RV_dice", "MYO_dice", "RV_hd95", "MYO_hd95", "mean_dice", "mean_hd95"]
    assert row["mean_dice"] == 0.75
    assert row["mean_hd95"] == 4.0  # the NaN class is left out of the mean
    assert list(m.to_row()) == ["1_dice", "2_dice", "1_hd95", "2_hd95", "mean_dice", "mean_hd95"]


def test_summarize_excludes_and_counts_nans() -> None:
    cases = [
        CaseMetrics({1: 1.0, 2: 0.5}, {1: 0.0, 2: 2.0}),
        CaseMetrics({1: 0.0, 2: 0.7}, {1: math.nan, 2: 4.0}),
        CaseMetrics({1: 0.5, 2: 0.9}, {1: 6.0, 2: 6.0}),
    ]
    s = summarize(cases, [1, 2])
    assert s["dice"][1].mean == pytest.approx(0.5)
    assert s["dice"][1].std == pytest.approx(math.sqrt(1 / 6))  # population std of (1, 0, 0.5)
    assert (s["dice"][1].n, s["dice"][1].n_nan) == (3, 0)
    assert s["hd95"][1] == SummaryStat(3.0, 3.0, 2, 1)  # values 0 and 6: mean 3, population std 3
    assert s["hd95"][2].mean == pytest.approx(4.0) and s["hd95"][2].n == 3
    # the "mean" entry summarises each case's mean over classes: hd95 (1.0, 4.0, 6.0), dice (0.75, 0.35, 0.7)
    assert s["hd95"]["mean"].mean == pytest.approx(11 / 3)
    assert s["hd95"]["mean"].n == 3 and s["hd95"]["mean"].n_nan == 0
    assert s["dice"]["mean"].mean == pytest.approx((0.75 + 0.35 + 0.7) / 3)
    assert list(s["dice"]) == [1, 2, "mean"]


def test_summarize_with_only_nans_and_with_a_missing_class() -> None:
    s = summarize([CaseMetrics({1: 0.0}, {1: math.nan})], [1])
    assert s["hd95"][1].n == 0 and s["hd95"][1].n_nan == 1 and math.isnan(s["hd95"][1].mean)
    with pytest.raises(KeyError, match="class 2"):
        summarize([CaseMetrics({1: 0.0}, {1: 1.0})], [1, 2])
