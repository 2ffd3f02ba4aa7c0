from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from confkd.data.phantoms import IGNORE, make_phantom, write_phantom_dataset


def test_phantom_is_reproducible_and_varied() -> None:
    a, b, c = make_phantom(3), make_phantom(3), make_phantom(4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.label.shape != c.label.shape or not np.array_equal(a.label, c.label)


def test_phantom_structures_and_geometry() -> None:
    for seed in range(4):
        ph = make_phantom(seed)
        counts = np.bincount(ph.label.ravel(), minlength=4)
        assert (counts[1:] > 100).all(), counts  # RV, MYO and LV all present
        sx, sy, sz = ph.spacing
        assert 1.2 <= sx <= 1.8 and abs(sx - sy) < 1e-9 and 5.0 <= sz <= 10.0
        # the cavity is enclosed by the myocardium: no LV voxel touches background in-plane
        lv = ph.label == 3
        shifted = [np.roll(lv, s, axis=a) for a in (0, 1) for s in (1, -1)]
        neighbours = np.stack([ph.label[m] for m in shifted])
        assert not (neighbours == 0).any()
        # blood is brighter than muscle
        assert ph.image[ph.label == 3].mean() > 2 * ph.image[ph.label == 2].mean()


def test_scribbles_never_mislabel_and_cover_every_class() -> None:
    for seed in range(4):
        ph = make_phantom(seed)
        annotated = ph.scribble != IGNORE
        np.testing.assert_array_equal(ph.scribble[annotated], ph.label[annotated])
        assert set(np.unique(ph.scribble[annotated])) == {0, 1, 2, 3}
        assert annotated.mean() < 0.1  # sparse


def test_dataset_layout(tmp_path: Path) -> None:
    root = write_phantom_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=1, size=(64, 64), frames=2)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"]["ignore"] == 4
    splits = json.loads((root / "splits.json").read_text())
    assert splits == {"train": ["phantom001", "phantom002"], "val": ["phantom003"]}
    assert sorted(p.name for p in (root / "imagesTr").iterdir())[:2] == [
        "phantom001_frame01_0000.nii.gz",
        "phantom001_frame02_0000.nii.gz",
    ]
    img = nib.load(root / "imagesTr" / "phantom001_frame01_0000.nii.gz")
    lab = nib.load(root / "labelsTr" / "phantom001_frame01.nii.gz")
    np.testing.assert_allclose(img.affine, lab.affine)
    assert img.header.get_sform(coded=True)[1] == 1
    assert (root / "imagesTs" / "phantom004_frame02_0000.nii.gz").is_file()
