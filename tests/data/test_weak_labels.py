"""Weak-label generators: known answers on numpy fixtures, a property test, and one real ACDC label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from confkd.config import DataConfig
from confkd.data.weak_labels import (
    GENERATED_SOURCES,
    bbox_interior,
    case_rng,
    default_weak_params,
    erosion_seeds,
    make_weak_label,
    random_discs,
    weak_params_from_config,
)
from confkd.errors import ConfigError

IGNORE = 9


def _square(size: int = 30, lo: int = 5, hi: int = 25, value: int = 1) -> np.ndarray:
    label = np.zeros((size, size), dtype=np.uint8)
    label[lo:hi, lo:hi] = value
    return label


def _assert_subset(label: np.ndarray, sparse: np.ndarray, ignore: int = IGNORE) -> None:
    annotated = sparse != ignore
    assert np.array_equal(sparse[annotated], label[annotated]), "a seed carries a wrong class"


# ---------------------------------------------------------------------- erosion
def test_erosion_of_a_square_gives_the_inner_square() -> None:
    label = _square()  # 20x20 square of class 1 at [5:25, 5:25]
    sparse = erosion_seeds(label, classes=[1], iterations=2, ignore_index=IGNORE)
    expected = np.full_like(label, IGNORE)
    expected[7:23, 7:23] = 1  # 16x16
    np.testing.assert_array_equal(sparse, expected)


def test_erosion_falls_back_for_thin_structures_only() -> None:
    label = np.zeros((40, 40), dtype=np.int16)
    label[2:22, 2:22] = 1  # thick: survives 3 erosions
    label[30, 5:35] = 2  # 1 voxel wide: any erosion removes it -> the mask itself
    label[34:37, 5:35] = 3  # 3 voxels wide: survives exactly 1 erosion -> its centre line
    sparse = erosion_seeds(label, classes=[1, 2, 3], iterations=3, ignore_index=IGNORE)
    assert np.array_equal(np.argwhere(sparse == 1).min(0), [5, 5])  # 20x20 eroded 3 times -> [5:19]
    assert np.count_nonzero(sparse == 1) == 14 * 14
    np.testing.assert_array_equal(sparse == 2, label == 2)
    expected_3 = np.zeros_like(label, dtype=bool)
    expected_3[35, 6:34] = True
    np.testing.assert_array_equal(sparse == 3, expected_3)


def test_erosion_includes_background_by_default_and_zero_iterations_is_identity() -> None:
    label = _square()
    np.testing.assert_array_equal(erosion_seeds(label, iterations=0, ignore_index=IGNORE), label)
    sparse = erosion_seeds(label, iterations=1, ignore_index=IGNORE)
    assert set(np.unique(sparse)) == {0, 1, IGNORE}


def test_per_component_fallback_keeps_a_thin_component_next_to_a_thick_one() -> None:
    label = np.zeros((30, 30), dtype=np.int16)
    label[2:20, 2:20] = 1
    label[25, 2:28] = 1  # same class, separate thin component
    per_mask = erosion_seeds(label, classes=[1], iterations=2, ignore_index=IGNORE)
    per_component = erosion_seeds(label, classes=[1], iterations=2, ignore_index=IGNORE, per_component=True)
    assert not (per_mask[25] == 1).any()
    assert (per_component[25, 2:28] == 1).all()


def test_slice_wise_and_3d_erosion_differ_as_expected() -> None:
    label = np.zeros((10, 10, 3), dtype=np.int16)
    label[2:8, 2:8, :] = 1  # a 6x6 tube, 3 slices long along axis 2
    sliced = erosion_seeds(label, classes=[1], iterations=2, ignore_index=IGNORE, slice_axis=2)
    full = erosion_seeds(label, classes=[1], iterations=2, ignore_index=IGNORE, slice_axis=None)
    # slice by slice: every slice keeps its 2x2 core
    assert [np.count_nonzero(sliced[..., z] == 1) for z in range(3)] == [4, 4, 4]
    # in 3D the tube is only 3 voxels thick along z: 2 erosions empty it, 1 leaves the middle slice's 4x4 core
    assert [np.count_nonzero(full[..., z] == 1) for z in range(3)] == [0, 16, 0]
    np.testing.assert_array_equal(
        erosion_seeds(label, classes=[1], iterations=2, ignore_index=IGNORE, slice_axis=-1), sliced
    )


def test_voxels_already_ignored_are_never_annotated() -> None:
    label = _square()
    label[0:3, 0:3] = IGNORE
    for sparse in (
        erosion_seeds(label, iterations=0, ignore_index=IGNORE),
        bbox_interior(label, ignore_index=IGNORE),
        random_discs(label, ignore_index=IGNORE, rng=np.random.default_rng(0), radius=1, count=50),
    ):
        assert (sparse[0:3, 0:3] == IGNORE).all()
        _assert_subset(label, sparse)


# ---------------------------------------------------------------------- discs
def test_a_disc_of_radius_r_lies_entirely_inside_the_class() -> None:
    label = _square()
    for seed in range(5):
        sparse = random_discs(label, classes=[1], count=1, radius=3, rng=np.random.default_rng(seed), ignore_index=0)
        disc = sparse == 1
        # a whole disc of radius 3 has 29 voxels; it is not clipped, so its centre was >3 voxels from the edge
        assert disc.sum() == 29
        centre = np.argwhere(disc).mean(0)
        assert np.linalg.norm(np.argwhere(disc) - centre, axis=1).max() <= 3
        assert (label[disc] == 1).all()
        assert (sparse[~disc] == 0).all()


def test_discs_per_slice_and_deepest_fallback() -> None:
    label = np.zeros((20, 20, 4), dtype=np.int16)
    label[2:18, 2:18, 1:3] = 1
    label[5:8, 5:15, 3] = 2  # 3 voxels wide: no voxel is deeper than radius 3 -> deepest voxels, clipped
    sparse = random_discs(label, count=2, radius=3, rng=np.random.default_rng(1), ignore_index=IGNORE, slice_axis=2)
    _assert_subset(label, sparse)
    assert [bool((sparse[..., z] == 1).any()) for z in range(4)] == [False, True, True, False]
    assert (sparse[..., 3] == 2).any()
    assert (sparse[6, :, 3] == 2).any()  # centres on the middle row (the deepest)


def test_discs_are_reproducible_with_the_same_rng_seed() -> None:
    label = _square()
    a = random_discs(label, rng=np.random.default_rng(3), ignore_index=IGNORE)
    b = random_discs(label, rng=np.random.default_rng(3), ignore_index=IGNORE)
    c = random_discs(label, rng=np.random.default_rng(4), ignore_index=IGNORE)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------- bounding boxes
def test_bbox_interior_of_a_square() -> None:
    label = _square()  # box [5:25]: centre 14.5, half-extent 10 -> kept box [10:20]
    sparse = bbox_interior(label, shrink=0.5, margin=2, ignore_index=IGNORE)
    expected = np.full_like(label, IGNORE)
    expected[10:20, 10:20] = 1
    background = np.ones_like(label, dtype=bool)
    background[3:27, 3:27] = False  # the box grown by the margin
    expected[background] = 0
    np.testing.assert_array_equal(sparse, expected)


def test_bbox_interior_of_a_ring_falls_back_to_the_voxels_nearest_the_centre() -> None:
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    label = np.zeros((40, 40), dtype=np.int16)
    label[r < 14] = 2  # ring (myocardium)
    label[r < 10] = 3  # cavity: the ring's box centre lies here
    sparse = bbox_interior(label, shrink=0.5, ignore_index=IGNORE)
    _assert_subset(label, sparse)
    assert (sparse == 2).any()
    assert (sparse == 3).any()


# ---------------------------------------------------------------------- property test
@st.composite
def blob_labels(draw: st.DrawFn) -> np.ndarray:
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(4, 24 if ndim == 2 else 10)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**32 - 1))
    n_classes = draw(st.integers(2, 4))
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=draw(st.floats(0.5, 2.5)))
    edges = np.quantile(field, np.linspace(0, 1, n_classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.int16)


@settings(max_examples=25, deadline=None)
@given(label=blob_labels(), slice_axis=st.sampled_from([None, 0]), seed=st.integers(0, 1000))
def test_every_generator_only_annotates_true_classes(label: np.ndarray, slice_axis: int | None, seed: int) -> None:
    axis = slice_axis if label.ndim == 3 else None
    outputs = {
        "erosion": erosion_seeds(label, iterations=3, ignore_index=IGNORE, slice_axis=axis),
        "discs": random_discs(label, radius=2, rng=np.random.default_rng(seed), ignore_index=IGNORE, slice_axis=axis),
        "bbox": bbox_interior(label, shrink=0.5, ignore_index=IGNORE, slice_axis=axis),
    }
    for name, sparse in outputs.items():
        assert sparse.shape == label.shape, name
        assert np.issubdtype(sparse.dtype, np.integer), name
        _assert_subset(label, sparse)
    # erosion and discs never drop a class present in the (slice of the) label
    for sparse in (outputs["erosion"], outputs["discs"]):
        assert set(np.unique(label)) == set(np.unique(sparse)) - {IGNORE}


# ---------------------------------------------------------------------- dispatch, dtypes, rng
def test_output_dtype_keeps_the_input_type_when_ignore_fits() -> None:
    label = _square()
    assert erosion_seeds(label, ignore_index=255).dtype == np.uint8
    assert erosion_seeds(label, ignore_index=300).dtype == np.int16
    assert erosion_seeds(label.astype(np.float32), ignore_index=4).dtype == np.int16
    with pytest.raises(ValueError, match="integers"):
        erosion_seeds(label + 0.5, ignore_index=4)
    with pytest.raises(ValueError, match="3D"):
        erosion_seeds(label, ignore_index=4, slice_axis=0)


def test_make_weak_label_dispatches_with_params_or_config() -> None:
    label = _square()
    np.testing.assert_array_equal(
        make_weak_label(label, "erosion", ignore_index=IGNORE, params={"iterations": 2}),
        erosion_seeds(label, iterations=2, ignore_index=IGNORE),
    )
    cfg = DataConfig(bbox_shrink=0.25)
    np.testing.assert_array_equal(
        make_weak_label(label, "bbox", ignore_index=IGNORE, data_cfg=cfg),
        bbox_interior(label, shrink=0.25, ignore_index=IGNORE),
    )
    np.testing.assert_array_equal(
        make_weak_label(label, "discs", ignore_index=IGNORE, data_cfg=DataConfig(weak_seed=7)),
        random_discs(label, rng=np.random.default_rng(7), ignore_index=IGNORE),
    )
    assert weak_params_from_config("discs", DataConfig(disc_radius=5)) == {"count": 2, "radius": 5}
    assert default_weak_params("bbox") == {"shrink": 0.5, "margin": 2}
    assert set(GENERATED_SOURCES) == {"erosion", "discs", "bbox"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "scribble"}, "available options are: erosion, discs, bbox"),
        ({"source": "scribbles"}, "read from scribblesTr"),
        ({"source": "erosion", "params": {"radius": 3}}, "valid parameters: iterations"),
        ({"source": "discs"}, "pass rng"),
        ({"source": "bbox", "params": {}, "data_cfg": DataConfig()}, "not both"),
    ],
)
def test_make_weak_label_errors_are_helpful(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_weak_label(_square(), ignore_index=IGNORE, **kwargs)


def test_case_rng_depends_on_seed_and_case_only() -> None:
    draw = lambda seed, case: case_rng(seed, case).integers(0, 2**31, size=4).tolist()  # noqa: E731
    assert draw(0, "patient001_frame01") == draw(0, "patient001_frame01")
    assert draw(0, "patient001_frame01") != draw(0, "patient001_frame12")
    assert draw(0, "patient001_frame01") != draw(1, "patient001_frame01")


# ---------------------------------------------------------------------- real data
@pytest.mark.data
def test_erosion_seeds_on_a_real_acdc_label_are_a_subset_of_it(acdc_dir: Path) -> None:
    import nibabel as nib

    image = nib.load(str(acdc_dir / "labelsTr" / "patient001_frame01.nii.gz"))
    label = np.asarray(image.dataobj)
    slice_axis = int(np.argmax(image.header.get_zooms()[:3]))
    assert slice_axis == 2
    sparse = erosion_seeds(label, iterations=10, ignore_index=4, slice_axis=slice_axis)
    _assert_subset(label, sparse, ignore=4)
    for z in range(label.shape[2]):
        present = set(np.unique(label[..., z]).tolist())
        assert set(np.unique(sparse[..., z]).tolist()) - {4} == present  # every structure keeps a seed
    assert 0 < np.count_nonzero(sparse[label > 0] != 4) < np.count_nonzero(label > 0)
