"""The in-memory training set and the mixed strong/weak batch sampler.

Every strong and weak case of the manifest is read once and preprocessed with the model's config by the same
function inference uses (:func:`confkd.inference.predict.preprocess_image`). A case is kept as

* ``image``: ``[S, C, *spatial]`` float16, where an *item* is one slice ``[C, H, W]`` in 2D (``S`` slices) and the
  whole volume ``[C, D, H, W]`` in 3D (``S == 1``). float16 halves the memory of the largest tensor; z-scored
  intensities keep about three significant digits, well below the scanner noise. The sampler hands out float16
  and the trainer casts on the device, which also halves the host-to-device traffic.
* ``label``: ``[S, *spatial]`` uint8 (int16 when the ignore index does not fit): the dense label of a strong
  case or the sparse label of a weak one. Only the label matching the case's supervision is kept; the batch
  says which rows are strong. Padding (from preprocessing and from cropping) carries the ignore index, so that
  padding never counts as background.

Pools are per item: strong items and weak items. Weak slices without any annotation stay in the pool: the KL and
entropy terms use every voxel of them.

Each draw takes ``n_strong`` strong and ``n_weak`` weak items uniformly with replacement from a
``torch.Generator`` (the only source of randomness, so its state is the sampler's state), and crops each to the
patch size. As in nnU-Net, a fraction of the crops (``train.foreground_fraction``, a third by default; each crop
independently) are centred on an annotated non-background voxel: a class is drawn uniformly among those present
in the item, then a voxel of that class. Items smaller than the patch are padded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from confkd.config import PreprocessConfig, TrainConfig
from confkd.data.manifest import Manifest, ManifestEntry, Supervision
from confkd.data.preprocessing import PreprocessState, median_spacing, preprocess_label, select_slice_axis
from confkd.data.volume import read_volume
from confkd.errors import ConfigError, DatasetError
from confkd.inference.predict import preprocess_image

__all__ = [
    "Batch",
    "MixedBatchSampler",
    "RawCase",
    "TrainCase",
    "TrainingSet",
    "default_patch_size",
    "read_case",
]

logger = logging.getLogger(__name__)

#: per-side cap of the default patch size: 2D slices, 3D volumes (nnU-Net's 3D patches rarely exceed 128)
PATCH_CAP = {2: 256, 3: 128}
#: foreground voxel locations kept per class and item (evenly subsampled beyond this; nnU-Net keeps 10k too)
MAX_LOCATIONS = 10_000


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class RawCase:
    """One case as read from disk: image channels and its training label, ``[i, j, k]`` each."""

    entry: ManifestEntry
    channels: tuple[np.ndarray, ...]
    label: np.ndarray | None
    spacing: tuple[float, float, float]


def _read_3d(path: object, what: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    volume = read_volume(path)  # type: ignore[arg-type]
    if volume.is_4d:
        raise DatasetError(f"{path}: a 4D {what} of shape {volume.shape}; training needs one 3D volume per case")
    return np.asarray(volume.array), volume.spacing


def read_case(entry: ManifestEntry, manifest: Manifest, cfg: PreprocessConfig, *, with_label: bool = True) -> RawCase:
    """Read ``entry``'s image channels and the label its supervision calls for.

    Strong: the dense label. Weak: the scribble file, or a sparse label generated from the dense one by
    ``manifest.weak_label_for`` (slice by slice along the 2D slice axis, in full 3D for 3D models). None
    (validation): the dense label when there is one. Raises :class:`DatasetError` naming the file.
    """
    first, spacing = _read_3d(entry.image_paths[0], "image")
    arrays = [first]
    for image_path in entry.image_paths[1:]:
        array, _ = _read_3d(image_path, "image")
        if array.shape != first.shape:
            raise DatasetError(f"{image_path}: channel of shape {array.shape} differs from {entry.image_paths[0]}")
        arrays.append(array)
    label: np.ndarray | None = None
    scribbles = entry.supervision is Supervision.WEAK and entry.weak_source in (None, "scribbles")
    path = entry.scribble_path if scribbles else entry.label_path
    if with_label and path is None and entry.supervision is not Supervision.NONE:
        raise DatasetError(f"case {entry.case!r}: no label file for its {entry.supervision.value} supervision")
    if with_label and path is not None:
        label, _ = _read_3d(path, "label map")
        if label.shape != first.shape:
            raise DatasetError(f"{path}: label of shape {label.shape} does not match its image {first.shape}")
        if entry.supervision is Supervision.WEAK and not scribbles:
            axis = select_slice_axis(spacing, cfg) if cfg.spatial_dims == 2 else None
            label = manifest.weak_label_for(entry, label, slice_axis=axis)
        _check_label_values(label, manifest, path)
    return RawCase(entry, tuple(arrays), label, spacing)


def _check_label_values(label: np.ndarray, manifest: Manifest, path: object) -> None:
    lab = np.asarray(label)
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.rint(lab)):
        raise DatasetError(f"{path}: label map holds non-integer values")
    bad = (lab < 0) | ((lab >= manifest.num_classes) & (lab != manifest.ignore_index))
    if bad.any():
        value = lab[bad].flat[0]
        raise DatasetError(
            f"{path}: label value {value:g} is neither a class in [0, {manifest.num_classes}) nor the ignore "
            f"index {manifest.ignore_index}; check dataset.json's labels"
        )


def _read_all(
    entries: Sequence[ManifestEntry], manifest: Manifest, cfg: PreprocessConfig, threads: int
) -> list[RawCase]:
    # decompression (zlib) and resampling release the GIL: threads overlap reading and decoding
    if threads <= 1 or len(entries) <= 1:
        return [read_case(e, manifest, cfg) for e in entries]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda e: read_case(e, manifest, cfg), entries))


# ------------------------------------------------------------------------------------------- the training set
@dataclass
class TrainCase:
    """One preprocessed case; see the module docstring for the tensor layouts."""

    name: str
    patient: str
    strong: bool
    image: Tensor  # [S, C, *spatial] float16
    label: Tensor  # [S, *spatial] uint8 / int16
    pad_values: tuple[float, ...]  # per channel: the normalised value of the image's padding
    state: PreprocessState
    # per item, per class present: flat indices of annotated voxels of that class (subsampled to MAX_LOCATIONS)
    locations: list[list[Tensor]] = field(repr=False, default_factory=list)

    @property
    def num_items(self) -> int:
        return int(self.image.shape[0])


def _label_dtype(ignore_index: int, num_classes: int) -> torch.dtype:
    return torch.uint8 if max(ignore_index, num_classes - 1) <= 255 and ignore_index >= 0 else torch.int16


def _locations(label: Tensor, num_classes: int) -> list[Tensor]:
    flat = label.reshape(-1)
    out = []
    for c in range(1, num_classes):
        idx = (flat == c).nonzero().squeeze(1)
        if idx.numel() > MAX_LOCATIONS:
            idx = idx[torch.linspace(0, idx.numel() - 1, MAX_LOCATIONS).long()]
        if idx.numel():
            out.append(idx.to(torch.int32))
    return out


class TrainingSet:
    """The strong and weak cases of a manifest, preprocessed and held in memory. Build it with :meth:`load`."""

    def __init__(
        self,
        cases: Sequence[TrainCase],
        *,
        cfg: PreprocessConfig,
        target_spacing: tuple[float, ...] | None,
        num_classes: int,
        ignore_index: int,
    ) -> None:
        self.cases = list(cases)
        self.cfg = cfg
        self.target_spacing = target_spacing
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        for i, case in enumerate(self.cases):
            pools[case.strong].extend((i, s) for s in range(case.num_items))
        # [n, 2] (case index, item index) tables
        self.strong_items = torch.tensor(pools[True], dtype=torch.int64).reshape(-1, 2)
        self.weak_items = torch.tensor(pools[False], dtype=torch.int64).reshape(-1, 2)

    @property
    def spatial_dims(self) -> int:
        return int(self.cfg.spatial_dims)

    @property
    def in_channels(self) -> int:
        return int(self.cases[0].image.shape[1]) if self.cases else 0

    @property
    def num_items(self) -> int:
        return len(self.strong_items) + len(self.weak_items)

    def item_shapes(self) -> list[tuple[int, ...]]:
        """The network-space spatial shape of every case (one entry per case, not per slice)."""
        return [tuple(int(n) for n in c.image.shape[2:]) for c in self.cases]

    @classmethod
    def load(cls, manifest: Manifest, cfg: PreprocessConfig, *, threads: int = 1) -> TrainingSet:
        """Read and preprocess every strong and weak case of ``manifest``.

        When ``cfg.target_spacing`` is ``None`` the target is the median spacing of these cases
        (:func:`~confkd.data.preprocessing.median_spacing`), available as :attr:`target_spacing` so that it can
        be frozen into the saved config. All raw volumes are held until the median is known (the readers have no
        header-only mode), then released one by one as they are preprocessed. ``threads`` read files in parallel.
        """
        entries = [*manifest.strong_cases(), *manifest.weak_cases()]
        if not entries:
            raise DatasetError(
                f"{manifest.dataset_root}: the manifest has no strong or weak case in split {manifest.rule.split!r}; "
                "nothing to train on"
            )
        raw = _read_all(entries, manifest, cfg, threads)
        target = cfg.target_spacing
        if target is None:
            target = median_spacing([r.spacing for r in raw], cfg)
            logger.info("target spacing: training-set median %s mm", tuple(round(t, 4) for t in target))
        cases: list[TrainCase] = []
        label_dtype = _label_dtype(manifest.ignore_index, manifest.num_classes)
        raw.reverse()
        while raw:  # release each raw volume as soon as it is preprocessed
            r = raw.pop()
            image, state = preprocess_image(r.channels, r.spacing, cfg, target_spacing=target)
            assert r.label is not None  # read_case always reads the label of strong and weak cases
            label = preprocess_label(r.label, state, pad_value=manifest.ignore_index).to(label_dtype)
            # every normalisation maps the clip floor (the padding value) to the channel's minimum
            pads = tuple(float(image[:, c].amin()) for c in range(image.shape[1]))
            cases.append(
                TrainCase(
                    name=r.entry.case,
                    patient=r.entry.patient,
                    strong=r.entry.supervision is Supervision.STRONG,
                    image=image.to(torch.float16),
                    label=label,
                    pad_values=pads,
                    state=state,
                    locations=[_locations(label[s], manifest.num_classes) for s in range(label.shape[0])],
                )
            )
        data = cls(
            cases,
            cfg=cfg,
            target_spacing=tuple(target),
            num_classes=manifest.num_classes,
            ignore_index=manifest.ignore_index,
        )
        logger.info(
            "training set: %d strong and %d weak cases, %d strong and %d weak %s",
            sum(c.strong for c in cases),
            sum(not c.strong for c in cases),
            len(data.strong_items),
            len(data.weak_items),
            "slices" if cfg.spatial_dims == 2 else "volumes",
        )
        return data


def default_patch_size(shapes: Sequence[Sequence[int]], multiple: int, spatial_dims: int) -> tuple[int, ...]:
    """The per-axis median of ``shapes``, rounded up to ``multiple`` and capped (:data:`PATCH_CAP`)."""
    if not shapes:
        raise DatasetError("no training cases to derive a patch size from")
    med = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    cap = max(multiple, PATCH_CAP[spatial_dims] // multiple * multiple)
    return tuple(min(cap, math.ceil(m / multiple) * multiple) for m in med)


# ------------------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class Batch:
    """One training batch on the host, strong rows first.

    Shape:
        - image: ``[N, C, *patch]`` float16
        - label: ``[N, *patch]`` int64: dense on strong rows, sparse on weak rows, ignore index in padding
        - is_strong: ``[N]`` bool
        - foreground: ``[N]`` bool, True where the crop was centred on an annotated foreground voxel
        - items: ``[N, 2]`` int64 (case index, item index) into the :class:`TrainingSet`
    """

    image: Tensor
    label: Tensor
    is_strong: Tensor
    foreground: Tensor
    items: Tensor


class MixedBatchSampler:
    """Draws ``n_strong`` strong and ``n_weak`` weak crops per batch (see the module docstring).

    ``foreground_fraction``: probability that a crop is centred on an annotated foreground voxel
    (``train.foreground_fraction``). ``pin_memory``: allocate the image, label and ``is_strong`` tensors in pinned
    memory (for CUDA training).

    A count of 0 or an empty pool leaves that part out, so the batch holds the other pool only (the lower bound
    has no weak images); both empty raises :class:`DatasetError`. ``seed`` and ``rank`` seed the generator, so
    each rank of a distributed run draws different items. :meth:`state_dict` captures the generator exactly.
    """

    def __init__(
        self,
        data: TrainingSet,
        n_strong: int,
        n_weak: int,
        patch_size: Sequence[int],
        *,
        seed: int,
        rank: int = 0,
        foreground_fraction: float = TrainConfig.foreground_fraction,
        pin_memory: bool = False,
    ) -> None:
        if len(patch_size) != data.spatial_dims or any(p < 1 for p in patch_size):
            raise ConfigError(
                f"train.patch_size={list(patch_size)} needs {data.spatial_dims} positive sizes for "
                f"spatial_dims={data.spatial_dims}"
            )
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ConfigError(f"train.foreground_fraction={foreground_fraction!r} must be a fraction in [0, 1]")
        self.data = data
        self.patch_size = tuple(int(p) for p in patch_size)
        self.n_strong = n_strong if len(data.strong_items) else 0
        self.n_weak = n_weak if len(data.weak_items) else 0
        if self.n_strong + self.n_weak == 0:
            raise DatasetError(
                f"no training items to draw: {len(data.strong_items)} strong and {len(data.weak_items)} weak "
                f"items for train.strong_per_batch={n_strong}, train.weak_per_batch={n_weak}; check data.n_strong "
                "and the batch composition"
            )
        for name, asked, got, pool in (
            ("strong", n_strong, self.n_strong, data.strong_items),
            ("weak", n_weak, self.n_weak, data.weak_items),
        ):
            if asked and not got:
                logger.warning("no %s items (pool of %d): batches hold %s items only", name, len(pool), name)
        self.foreground_fraction = foreground_fraction
        self.pin = pin_memory
        self.generator = torch.Generator()
        self.generator.manual_seed(sampler_seed(seed, rank))

    @property
    def batch_size(self) -> int:
        return self.n_strong + self.n_weak

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def sample(self) -> Batch:
        """Draw one batch (consumes a fixed amount of the generator per batch, whatever the branches taken)."""
        nd = len(self.patch_size)
        n = self.batch_size
        first = self.data.cases[0].image
        # allocated pinned when the batch goes to a GPU, so that the copy can be asynchronous
        image = torch.empty((n, first.shape[1], *self.patch_size), dtype=first.dtype, pin_memory=self.pin)
        label = torch.empty((n, *self.patch_size), dtype=torch.int64, pin_memory=self.pin)
        is_strong = torch.zeros(n, dtype=torch.bool, pin_memory=self.pin)
        is_strong[: self.n_strong] = True
        foreground = torch.zeros(n, dtype=torch.bool)
        items = torch.empty((n, 2), dtype=torch.int64)
        # columns: item, foreground?, class, voxel, one offset per axis
        u = torch.rand((n, 4 + nd), generator=self.generator, dtype=torch.float64)
        for row in range(n):
            pool = self.data.strong_items if row < self.n_strong else self.data.weak_items
            items[row] = pool[_index(u[row, 0], len(pool))]
            case = self.data.cases[int(items[row, 0])]
            s = int(items[row, 1])
            shape = tuple(int(x) for x in case.image.shape[2:])
            locations = case.locations[s]
            centre = None
            if bool(u[row, 1] < self.foreground_fraction) and locations:
                locs = locations[_index(u[row, 2], len(locations))]
                flat = int(locs[_index(u[row, 3], len(locs))])
                centre = np.unravel_index(flat, shape)
                foreground[row] = True
            starts = []
            for d in range(nd):
                lo, hi = min(0, shape[d] - self.patch_size[d]), max(0, shape[d] - self.patch_size[d])
                if centre is None:
                    start = lo + _index(u[row, 4 + d], hi - lo + 1)
                else:
                    start = min(max(int(centre[d]) - self.patch_size[d] // 2, lo), hi)
                starts.append(start)
            _crop_into(image[row], case.image[s], starts, case.pad_values)
            _crop_into(label[row], case.label[s], starts, (self.data.ignore_index,))
        return Batch(image, label, is_strong, foreground, items)


def sampler_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (``seed``, ``rank``, ``stream``): nearby seeds give unrelated streams."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _index(u: Tensor, n: int) -> int:
    return min(int(float(u) * n), n - 1)


def _crop_into(out: Tensor, src: Tensor, starts: Sequence[int], fill: Sequence[float]) -> None:
    """Copy the window ``src[..., start:start + size]`` (trailing axes) into ``out``, padding outside ``src``.

    ``fill`` is one value, or one per leading channel of ``out``.
    """
    nd = len(starts)
    if len(fill) == 1:
        out.fill_(fill[0])
    else:
        for c, value in enumerate(fill):
            out[c].fill_(value)
    dst_sl, src_sl = [], []
    for d, start in enumerate(starts):
        n_src, n_out = src.shape[src.ndim - nd + d], out.shape[out.ndim - nd + d]
        a, b = max(start, 0), min(start + n_out, n_src)
        src_sl.append(slice(a, b))
        dst_sl.append(slice(a - start, b - start))
    lead = [slice(None)] * (out.ndim - nd)
    out[tuple(lead + dst_sl)] = src[tuple(lead + src_sl)]
