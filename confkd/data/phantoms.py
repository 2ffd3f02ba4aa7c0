"""Synthetic cardiac-like cine-MRI phantoms with dense masks and scribble-like sparse labels.

Each phantom is a short-axis stack (like an ACDC frame): a left-ventricle cavity (LV, label 3) inside a
myocardial ring (MYO, 2), a right-ventricle crescent (RV, 1) wrapped around one side, on a textured background
(0). Size, wall thickness, position and in-plane orientation vary per case and taper from base to apex along the
slices; the image has blood/muscle contrast, smooth background texture, a multiplicative bias field and
Rician-like noise. The geometry is real-looking: anisotropic spacing (in-plane ~1.2-1.8 mm, 5-10 mm between
slices) and an oblique affine, so the phantoms also exercise the geometry code.

Scribbles imitate expert ones (Valvano et al. 2021): a thin arc through the middle of the myocardium, a stroke
across the LV cavity, an arc through the RV, and a loop of background around the heart, each clipped to its own
structure so a scribble never mislabels a voxel. Every other voxel carries the ignore label.

Used by tests and by the demo: no data and no downloads needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["LABELS", "Phantom", "make_phantom", "write_phantom_dataset"]

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3, "ignore": 4}
IGNORE = LABELS["ignore"]


@dataclass(frozen=True)
class Phantom:
    """One synthetic case. Arrays are indexed [i, j, k] with k the slice axis.

    Shapes: ``image`` (X, Y, S) float32; ``label`` and ``scribble`` (X, Y, S) uint8; ``affine`` (4, 4).
    """

    image: np.ndarray
    label: np.ndarray
    scribble: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation matrix whose angle is at most ``max_deg`` degrees."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    theta = np.radians(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="wrap")
    field -= field.mean()
    return field / (field.std() + 1e-8)


def make_phantom(
    seed: int,
    *,
    size: tuple[int, int] = (128, 128),
    slices: int | None = None,
    noise: float = 0.08,
    oblique: bool = True,
) -> Phantom:
    """Generate one reproducible phantom from ``seed``.

    ``size`` is the in-plane matrix; ``slices`` defaults to a random 6-10. The heart occupies the central
    part of the field of view, as in a cardiac short-axis acquisition.
    """
    rng = np.random.default_rng(seed)
    nx, ny = size
    ns = int(slices if slices is not None else rng.integers(6, 11))
    spacing_xy = rng.uniform(1.2, 1.8)
    spacing_z = rng.uniform(5.0, 10.0)

    # heart geometry in millimetres, tapering from base (slice 0) to apex
    fov = min(nx, ny) * spacing_xy
    centre = np.array([nx / 2, ny / 2]) + rng.uniform(-0.12, 0.12, size=2) * np.array([nx, ny])
    lv_radius = rng.uniform(0.09, 0.14) * fov
    wall = rng.uniform(0.03, 0.05) * fov
    rv_angle = rng.uniform(0, 2 * np.pi)
    rv_scale = rng.uniform(0.8, 1.1)
    elong = rng.uniform(0.85, 1.15)

    xs = (np.arange(nx) - centre[0]) * spacing_xy
    ys = (np.arange(ny) - centre[1]) * spacing_xy
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    ca, sa = np.cos(rv_angle), np.sin(rv_angle)
    u = ca * gx + sa * gy  # axis pointing towards the RV
    v = -sa * gx + ca * gy

    label = np.zeros((nx, ny, ns), dtype=np.uint8)
    scribble = np.full((nx, ny, ns), IGNORE, dtype=np.uint8)
    for k in range(ns):
        taper = 1.0 - 0.55 * (k / max(ns - 1, 1)) ** 1.5
        r_lv = lv_radius * taper
        r_epi = r_lv + wall * (0.8 + 0.4 * taper)
        rho = np.sqrt((u / elong) ** 2 + (v * elong) ** 2)
        lv = rho < r_lv
        myo = (rho >= r_lv) & (rho < r_epi)
        # RV: an ellipse offset towards +u, minus the (dilated) left heart -> a crescent
        rv_c = r_epi * 0.9
        rv_r = r_epi * rv_scale * (0.6 + 0.4 * taper)
        rv_ell = ((u - rv_c) / (rv_r * 1.05)) ** 2 + (v / (rv_r * 1.25)) ** 2 < 1.0
        rv = rv_ell & (rho >= r_epi + 0.8 * spacing_xy)
        if k == ns - 1:  # apex: often no RV and no cavity in the last slice
            rv[:] = False
        label[..., k][rv] = 1
        label[..., k][myo] = 2
        label[..., k][lv] = 3

        # scribbles: thin curves through each structure, clipped to it
        theta = np.arctan2(v, u)
        t = 1.5 * spacing_xy  # stroke thickness in mm
        start = rng.uniform(-np.pi, np.pi)
        span = rng.uniform(1.2 * np.pi, 1.9 * np.pi)
        arc = np.mod(theta - start, 2 * np.pi) < span
        mid_myo = np.abs(rho - (r_lv + r_epi) / 2) < t / 2
        scribble[..., k][mid_myo & arc & myo] = 2
        ang = rng.uniform(0, np.pi)
        stroke = (np.abs(-np.sin(ang) * u + np.cos(ang) * v) < t / 2) & (rho < 0.7 * r_lv)
        scribble[..., k][stroke & lv] = 3
        if rv.any():
            rv_mid = ndimage.binary_erosion(rv, iterations=2) if rv.sum() > 60 else rv
            edt = ndimage.distance_transform_edt(rv_mid)
            ridge = rv_mid & (edt >= 0.6 * edt.max())
            scribble[..., k][ridge & rv] = 1
        bg_loop = np.abs(rho - (r_epi + rv_r * 1.6)) < t / 2
        bg_arc = np.mod(theta - rng.uniform(-np.pi, np.pi), 2 * np.pi) < rng.uniform(1.0, 1.8) * np.pi
        scribble[..., k][bg_loop & bg_arc & (label[..., k] == 0)] = 0

    # intensities: blood bright, muscle dark, textured surroundings, bias field, Rician-like noise
    texture = _smooth_noise(rng, (nx, ny, ns), sigma=(6, 6, 1))
    body = np.clip(0.35 + 0.12 * texture, 0.05, 0.8)
    means = {1: rng.uniform(0.75, 0.9), 2: rng.uniform(0.15, 0.25), 3: rng.uniform(0.85, 1.0)}
    image = body.copy()
    for cls, mean in means.items():
        image[label == cls] = mean
    image = ndimage.gaussian_filter(image, sigma=(0.7, 0.7, 0))  # partial-volume blur at the edges
    bias = np.exp(0.25 * _smooth_noise(rng, (nx, ny, ns), sigma=(30, 30, 3)))
    image *= bias
    re = image + noise * rng.normal(size=image.shape)
    im = noise * rng.normal(size=image.shape)
    image = np.sqrt(re**2 + im**2)
    image = (image * rng.uniform(300, 900)).astype(np.float32)  # scanner-like raw intensity range

    rot = _rotation(rng, 25.0) if oblique else np.eye(3)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([spacing_xy, spacing_xy, spacing_z])
    affine[:3, 3] = rng.uniform(-150, 150, size=3)
    return Phantom(image=image, label=label, scribble=scribble, affine=affine)


def write_phantom_dataset(
    root: str | Path,
    *,
    n_train: int = 12,
    n_val: int = 4,
    n_test: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    frames: int = 1,
) -> Path:
    """Write phantoms as an nnU-Net v2 raw dataset with ``scribblesTr/`` and ``splits.json``.

    Patients are ``phantomNNN``; with ``frames`` > 1 each patient gets several cases
    (``phantomNNN_frameFF``) that share their patient's split, like ACDC's ED/ES frames.
    Test patients go to ``imagesTs`` (with their labels in ``labelsTs`` for scoring demos).
    """
    import nibabel as nib

    from confkd.io_utils import atomic_write_text

    root = Path(root)
    for sub in ("imagesTr", "labelsTr", "scribblesTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def save(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
        img = nib.Nifti1Image(array.astype(dtype), affine)
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, path)

    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    n_total = n_train + n_val + n_test
    for p in range(n_total):
        patient = f"phantom{p + 1:03d}"
        part = "train" if p < n_train else "val" if p < n_train + n_val else "test"
        splits[part].append(patient)
        for f in range(frames):
            case = patient if frames == 1 else f"{patient}_frame{f + 1:02d}"
            ph = make_phantom(seed * 100_003 + p * 101 + f, size=size)
            if part == "test":
                save(ph.image, ph.affine, root / "imagesTs" / f"{case}_0000.nii.gz", np.float32)
                save(ph.label, ph.affine, root / "labelsTs" / f"{case}.nii.gz", np.uint8)
            else:
                save(ph.image, ph.affine, root / "imagesTr" / f"{case}_0000.nii.gz", np.float32)
                save(ph.label, ph.affine, root / "labelsTr" / f"{case}.nii.gz", np.uint8)
                save(ph.scribble, ph.affine, root / "scribblesTr" / f"{case}.nii.gz", np.uint8)
    dataset_json = {
        "name": "confkd-phantoms",
        "description": "Synthetic cardiac-like short-axis phantoms generated by confkd (no patient data).",
        "channel_names": {"0": "cineMRI"},
        "labels": LABELS,
        "numTraining": (n_train + n_val) * frames,
        "file_ending": ".nii.gz",
    }
    atomic_write_text(root / "dataset.json", json.dumps(dataset_json, indent=2) + "\n")
    atomic_write_text(root / "splits.json", json.dumps({k: splits[k] for k in ("train", "val")}, indent=2) + "\n")
    return root
