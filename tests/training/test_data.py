"""The in-memory training set and the mixed strong/weak batch sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from confkd.config import DataConfig, PreprocessConfig, TrainConfig
from confkd.data.dataset import NnUNetDataset
from confkd.data.manifest import Manifest, build_manifest_from_config
from confkd.data.phantoms import IGNORE, write_phantom_dataset
from confkd.data.preprocessing import median_spacing, preprocess, preprocess_label
from confkd.data.volume import read_volume
from confkd.errors import ConfigError, DatasetError
from confkd.training.data import (
    MixedBatchSampler,
    TrainingSet,
    default_patch_size,
)
from confkd.training.validation import read_validation_cases

CFG = PreprocessConfig(pad_multiple=8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_train=6, n_val=2, n_test=0, size=(48, 48))


def _manifest(root: Path, **data: object) -> Manifest:
    return build_manifest_from_config(NnUNetDataset.open(root), DataConfig(**data))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def manifest(dataset: Path) -> Manifest:
    return _manifest(dataset, n_strong=2)


@pytest.fixture(scope="module")
def data(manifest: Manifest) -> TrainingSet:
    return TrainingSet.load(manifest, CFG)


def test_pools_follow_the_manifest_per_patient(manifest: Manifest, data: TrainingSet) -> None:
    strong = {e.case for e in manifest.strong_cases()}
    weak = {e.case for e in manifest.weak_cases()}
    assert {c.name for c in data.cases if c.strong} == strong
    assert {c.name for c in data.cases if not c.strong} == weak
    # every strong item comes from a strong patient's case, every weak item from a weak one's
    assert all(data.cases[int(i)].name in strong for i in data.strong_items[:, 0])
    assert all(data.cases[int(i)].name in weak for i in data.weak_items[:, 0])
    # one item per slice, every slice kept (also weak slices without any annotation)
    assert len(data.strong_items) == sum(c.num_items for c in data.cases if c.strong)
    assert len(data.weak_items) == sum(c.num_items for c in data.cases if not c.strong)
    for c in data.cases:
        assert c.image.dtype == torch.float16
        assert c.image.shape[0] == c.label.shape[0] == c.state.original_shape[c.state.slice_axis]


def test_labels_are_dense_for_strong_and_scribbles_for_weak(manifest: Manifest, data: TrainingSet) -> None:
    assert data.target_spacing == median_spacing(
        [read_volume(e.image_paths[0]).spacing for e in (*manifest.strong_cases(), *manifest.weak_cases())], CFG
    )
    by_name = {e.case: e for e in manifest.entries}
    for case in data.cases:
        entry = by_name[case.name]
        path = entry.label_path if case.strong else entry.scribble_path
        assert path is not None
        volume = read_volume(entry.image_paths[0])
        _, state = preprocess(volume.array, volume.spacing, CFG, target_spacing=data.target_spacing)
        expected = preprocess_label(read_volume(path).array, state, pad_value=IGNORE)
        assert torch.equal(case.label.long(), expected)
        if not case.strong:
            assert (case.label == IGNORE).float().mean() > 0.5  # scribbles are sparse


def test_generated_weak_labels_are_subsets_of_the_dense_label(dataset: Path) -> None:
    manifest = _manifest(dataset, n_strong=2, weak_source="erosion", erosion_iterations=1)
    data = TrainingSet.load(manifest, PreprocessConfig(pad_multiple=8, target_spacing=(1.5, 1.5)))
    by_name = {e.case: e for e in manifest.entries}
    for case in data.cases:
        if case.strong:
            continue
        entry = by_name[case.name]
        assert entry.label_path is not None
        dense = preprocess_label(read_volume(entry.label_path).array, case.state, pad_value=IGNORE)
        annotated = case.label != IGNORE
        assert annotated.any()
        assert torch.equal(case.label.long()[annotated], dense[annotated])


def test_batch_composition_and_shapes(data: TrainingSet) -> None:
    sampler = MixedBatchSampler(data, 3, 5, (32, 40), seed=0)
    batch = sampler.sample()
    assert sampler.batch_size == 8
    assert batch.image.shape == (8, 1, 32, 40) and batch.image.dtype == torch.float16
    assert batch.label.shape == (8, 32, 40) and batch.label.dtype == torch.int64
    assert batch.is_strong.tolist() == [True] * 3 + [False] * 5
    strong_rows = {tuple(r) for r in data.strong_items.tolist()}
    weak_rows = {tuple(r) for r in data.weak_items.tolist()}
    assert all(tuple(r) in strong_rows for r in batch.items[:3].tolist())
    assert all(tuple(r) in weak_rows for r in batch.items[3:].tolist())
    valid = batch.label != IGNORE
    assert ((batch.label[valid] >= 0) & (batch.label[valid] < data.num_classes)).all()


def test_same_generator_state_gives_the_same_batch(data: TrainingSet) -> None:
    sampler = MixedBatchSampler(data, 2, 4, (32, 32), seed=7)
    state = sampler.state_dict()
    first = sampler.sample()
    sampler.load_state_dict(state)
    again = sampler.sample()
    for a, b in zip(
        (first.image, first.label, first.items, first.foreground),
        (again.image, again.label, again.items, again.foreground),
        strict=True,
    ):
        assert torch.equal(a, b)
    other = MixedBatchSampler(data, 2, 4, (32, 32), seed=7, rank=1).sample()
    assert not torch.equal(other.image, first.image)  # each rank draws its own items


def test_foreground_oversampling_fraction(data: TrainingSet) -> None:
    sampler = MixedBatchSampler(data, 8, 8, (16, 16), seed=1)
    forced, total, centred = 0, 0, 0
    for _ in range(60):
        batch = sampler.sample()
        forced += int(batch.foreground.sum())
        total += len(batch.foreground)
        for row in batch.foreground.nonzero().squeeze(1).tolist():
            crop = batch.label[row]
            # centred on an annotated foreground voxel: the crop holds one at (or, clamped at a border, near) the centre
            assert ((crop > 0) & (crop != IGNORE)).any()
            centred += int(0 < int(crop[8, 8]) < data.num_classes)
    # every phantom slice shows some anatomy (an item without annotated foreground would fall back to a random crop)
    assert all(locations for case in data.cases for locations in case.locations)
    fraction = TrainConfig().foreground_fraction  # the sampler's default is the config's
    expected = fraction * total
    sd = (total * fraction * (1 - fraction)) ** 0.5
    assert abs(forced - expected) < 4 * sd
    assert centred >= 0.95 * forced


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_foreground_fraction_is_honoured_at_the_extremes(data: TrainingSet, fraction: float) -> None:
    sampler = MixedBatchSampler(data, 4, 4, (16, 16), seed=3, foreground_fraction=fraction)
    centred = torch.cat([sampler.sample().foreground for _ in range(5)])
    assert centred.tolist() == [bool(fraction)] * len(centred)


def test_foreground_fraction_out_of_range_is_refused(data: TrainingSet) -> None:
    with pytest.raises(ConfigError, match=r"train\.foreground_fraction=1\.5 must be a fraction in \[0, 1\]"):
        MixedBatchSampler(data, 1, 1, (16, 16), seed=0, foreground_fraction=1.5)


def test_padding_uses_the_ignore_index(data: TrainingSet) -> None:
    big = max(max(s[1:]) for s in data.item_shapes()) + 16
    batch = MixedBatchSampler(data, 4, 4, (big, big), seed=0).sample()
    assert (batch.label[:, 0, :] == IGNORE).all() or (batch.label[:, -1, :] == IGNORE).all()
    for row in range(len(batch.label)):
        case_index, item = batch.items[row].tolist()
        case = data.cases[case_index]
        assert int((batch.label[row] != IGNORE).sum()) == int((case.label[item] != IGNORE).sum())
        outside = batch.label[row] == IGNORE
        image = batch.image[row, 0]
        assert (image[outside] >= case.pad_values[0]).all()
        assert image.min() == pytest.approx(case.pad_values[0], abs=1e-3)


def test_lower_bound_has_no_weak_pool(dataset: Path) -> None:
    manifest = _manifest(dataset, n_strong=None)
    data = TrainingSet.load(manifest, CFG)
    assert len(data.weak_items) == 0
    sampler = MixedBatchSampler(data, 3, 5, (32, 32), seed=0)  # the weak part is left out
    batch = sampler.sample()
    assert sampler.batch_size == 3 and batch.is_strong.all()
    with pytest.raises(DatasetError, match="no training items"):
        MixedBatchSampler(data, 0, 5, (32, 32), seed=0)


def test_weak_only_batches(data: TrainingSet) -> None:
    batch = MixedBatchSampler(data, 0, 4, (32, 32), seed=0).sample()
    assert batch.image.shape[0] == 4 and not batch.is_strong.any()


def test_three_dimensional_items_are_volumes(manifest: Manifest) -> None:
    cfg = PreprocessConfig(spatial_dims=3, pad_multiple=8)
    data = TrainingSet.load(manifest, cfg)
    assert len(data.target_spacing or ()) == 3
    assert all(c.num_items == 1 and c.image.ndim == 5 for c in data.cases)
    patch = default_patch_size(data.item_shapes(), 8, 3)
    batch = MixedBatchSampler(data, 1, 2, patch, seed=0).sample()
    assert batch.image.shape == (3, 1, *patch)
    assert batch.label.shape == (3, *patch)


def test_default_patch_size_rounds_up_and_caps() -> None:
    assert default_patch_size([(40, 200), (48, 210), (56, 230)], 16, 2) == (48, 224)
    assert default_patch_size([(512, 496)], 16, 2) == (256, 256)
    assert default_patch_size([(10, 300, 300)], 8, 3) == (16, 128, 128)


def test_validation_cases_are_the_labelled_val_split(manifest: Manifest) -> None:
    cases = read_validation_cases(manifest, "val", CFG)
    assert [c.name for c in cases] == [e.case for e in manifest.cases("val")]
    for c in cases:
        assert c.label.shape == c.channels[0].shape
        assert set(np.unique(c.label)) <= {0, 1, 2, 3}
