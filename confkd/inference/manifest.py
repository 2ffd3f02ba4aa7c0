"""The manifest of an exported model directory (``manifest.json`` next to ``model.onnx``): schema and reader.

``confkd export`` writes it (:mod:`confkd.export.manifest`); inference reads it here, so that
:mod:`confkd.inference.model` can load an exported directory without importing the exporter (imports run
``cli -> export -> confkd``). The schema is strict: unknown or missing fields are an error that lists them, and
:func:`load_manifest` refuses a directory whose ONNX file does not hash to the recorded ``onnx_sha256``, or whose
manifest disagrees with the ONNX file's metadata (a manifest edited after export).

Fields (all required):

=====================  ========================================================================================
``format``             :data:`FORMAT`; ``format_version``: :data:`FORMAT_VERSION`
``model_file``         the ONNX file's name inside the directory (``model.onnx``)
``input_name``         ``"image"``; ``output_names``: ``["probabilities", "entropy"]``
``spatial_dims``       2 or 3; ``in_channels``, ``num_classes``, ``divisor`` (every spatial size a multiple of it)
``bounds``             ``{"batch": [min, opt, max], "spatial": {"min": [...], "opt": [...], "max": [...]}}``
``preprocessing``      the resolved preprocess config; ``config``: the whole resolved training config
``labels``             ``{"names": [...], "values": [...], "ignore_index": int}`` (names/values exclude ignore)
``model_version``      e.g. ``"confkd 0.1.0 / confkd.yaml"``; ``versions``: confkd (trained), exporter, torch, onnx
``config_sha256``      sha256 of the training config as canonical JSON; ``checkpoint_sha256``: the source file's
``onnx_sha256``        sha256 of ``model_file`` (manifest only: the ONNX metadata cannot hold its own hash)
``opset``              the ONNX opset
``verification``       what the export measured against PyTorch (max differences, argmax agreement, tolerances)
=====================  ========================================================================================
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from confkd.errors import ManifestError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MANIFEST_ONLY_FIELDS",
    "MAX_SIDE",
    "Bounds",
    "Manifest",
    "canonical_json",
    "default_bounds",
    "file_sha256",
    "load_manifest",
    "manifest_from_dict",
]

FORMAT = "confkd-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: manifest fields that the ONNX metadata cannot hold (they are computed from the written file)
MANIFEST_ONLY_FIELDS = ("onnx_sha256", "verification")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: the same data always gives the same bytes (and the same hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bounds:
    """Declared input bounds of the exported graph (also the TensorRT optimisation profile).

    ``batch``: (min, opt, max); ``min_spatial`` / ``opt_spatial`` / ``max_spatial``: one size per spatial axis,
    each a multiple of the network divisor, ``min <= opt <= max``.
    """

    batch: tuple[int, int, int]
    min_spatial: tuple[int, ...]
    opt_spatial: tuple[int, ...]
    max_spatial: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": list(self.batch),
            "spatial": {"min": list(self.min_spatial), "opt": list(self.opt_spatial), "max": list(self.max_spatial)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Bounds:
        try:
            batch = tuple(int(b) for b in data["batch"])
            sp = data["spatial"]
            lo, opt, hi = (tuple(int(s) for s in sp[k]) for k in ("min", "opt", "max"))
        except (KeyError, TypeError, ValueError) as e:
            expected = "{batch: [min, opt, max], spatial: {min, opt, max}}"
            raise ManifestError(f"bounds {data!r}: expected {expected}") from e
        if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
            raise ManifestError(f"bounds.batch {list(batch)}: needs 1 <= min <= opt <= max")
        if not len(lo) == len(opt) == len(hi) or not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise ManifestError(f"bounds.spatial min {lo}, opt {opt}, max {hi}: needs 1 <= min <= opt <= max per axis")
        return cls((batch[0], batch[1], batch[2]), lo, opt, hi)

    def check_divisor(self, divisor: int) -> None:
        for name, sizes in (("min", self.min_spatial), ("opt", self.opt_spatial), ("max", self.max_spatial)):
            if any(s % divisor for s in sizes):
                raise ManifestError(f"bounds.spatial.{name} {sizes}: every size must be a multiple of {divisor}")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` as a typed object (see the module docstring for the fields)."""

    format: str
    format_version: int
    model_file: str
    input_name: str
    output_names: list[str]
    spatial_dims: int
    in_channels: int
    num_classes: int
    divisor: int
    bounds: Bounds
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    labels: dict[str, Any]
    model_version: str
    versions: dict[str, str]
    config_sha256: str
    checkpoint_sha256: str
    onnx_sha256: str
    opset: int
    verification: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bounds"] = self.bounds.to_dict()
        return out

    @property
    def label_names(self) -> dict[int, str]:
        """Class value -> name, background included, the ignore label excluded."""
        return {int(v): str(n) for v, n in zip(self.labels["values"], self.labels["names"], strict=True)}


_FIELDS = tuple(f.name for f in fields(Manifest))


def manifest_from_dict(data: Mapping[str, Any], where: str = "manifest") -> Manifest:
    """Validate a manifest dict strictly: unknown and missing fields are listed in the error."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields are: {', '.join(_FIELDS)}")
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}; re-export the model (`confkd export`)")
    if data["format"] != FORMAT:
        raise ManifestError(f"{where}: format {data['format']!r} is not {FORMAT!r}")
    version = data["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format_version {version!r} is not supported (this confkd reads up to {FORMAT_VERSION}); "
            "upgrade confkd"
        )
    values = dict(data)
    values["bounds"] = Bounds.from_dict(data["bounds"])
    try:
        manifest = Manifest(**values)
    except TypeError as e:  # pragma: no cover - the key checks above make this unreachable
        raise ManifestError(f"{where}: {e}") from e
    if manifest.spatial_dims not in (2, 3) or len(manifest.bounds.opt_spatial) != manifest.spatial_dims:
        raise ManifestError(
            f"{where}: spatial_dims {manifest.spatial_dims} and bounds {manifest.bounds.to_dict()} disagree"
        )
    manifest.bounds.check_divisor(manifest.divisor)
    labels = manifest.labels
    if not {"names", "values", "ignore_index"} <= set(labels) or len(labels["names"]) != manifest.num_classes:
        raise ManifestError(f"{where}: labels {labels!r} need names and values for {manifest.num_classes} classes")
    return manifest


def load_manifest(model_dir: str | Path, *, verify_hash: bool = True) -> Manifest:
    """Read ``model_dir/manifest.json`` and check that the ONNX file is the one it describes.

    Raises:
        ManifestError: no or unreadable manifest, schema violation, missing ONNX file, or (``verify_hash``) an
            ONNX file whose sha256 differs from ``onnx_sha256`` (modified, truncated or swapped after export), or
            a manifest field that differs from the ONNX metadata (the manifest was edited after export).
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{model_dir}: no {MANIFEST_NAME}; not an exported model directory (`confkd export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from e
    manifest = manifest_from_dict(data, str(path))
    onnx_path = model_dir / manifest.model_file
    if Path(manifest.model_file).name != manifest.model_file or not onnx_path.is_file():
        raise ManifestError(f"{path}: model_file {manifest.model_file!r} is not a file in {model_dir}")
    if verify_hash:
        actual = file_sha256(onnx_path)
        if actual != manifest.onnx_sha256:
            raise ManifestError(
                f"{onnx_path}: sha256 {actual[:12]}... does not match the manifest's {manifest.onnx_sha256[:12]}...; "
                "the file was modified after export: re-export the model"
            )
        # the hash vouches for the ONNX file, whose metadata carry every manifest field but MANIFEST_ONLY_FIELDS:
        # a manifest edited after export (labels, preprocessing, bounds...) disagrees with them
        metadata = _onnx_metadata(onnx_path)
        differ = [k for k in _FIELDS if k not in MANIFEST_ONLY_FIELDS and metadata.get(k, _ABSENT) != data[k]]
        if differ:
            raise ManifestError(
                f"{path}: {', '.join(differ)} differ(s) from the metadata of {manifest.model_file} (the file its "
                "onnx_sha256 vouches for); the manifest was modified after export: re-export the model"
            )
    return manifest


_ABSENT = object()


def _onnx_metadata(onnx_path: Path) -> dict[str, Any]:
    """The ``confkd.<field>`` metadata of an exported ONNX file, decoded (JSON values)."""
    import onnx  # lazy: slow to import, and only needed when an exported model is loaded

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
        return {
            p.key[len("confkd.") :]: json.loads(p.value) for p in model.metadata_props if p.key.startswith("confkd.")
        }
    except Exception as e:  # protobuf's DecodeError, JSON errors: both mean "not what export wrote"
        reason = " ".join(str(e).split())[:200]
        raise ManifestError(f"{onnx_path}: cannot read its confkd metadata ({type(e).__name__}: {reason})") from e


#: largest default spatial side of an exported model (and of a checkpoint's torch tiles)
MAX_SIDE = 512


def _round_up(value: int, divisor: int) -> int:
    return max(divisor, -(-value // divisor) * divisor)


def default_bounds(
    spatial_dims: int, divisor: int, patch_size: tuple[int, ...] | None, *, max_batch: int = 32
) -> Bounds:
    """Bounds from the checkpoint: opt = ``train.patch_size`` (224 per side in 2D, 96 in 3D when unset), max =
    2x opt per side capped at 512, min = the divisor, all rounded up to multiples of the divisor; batch
    1 / min(8, max) / ``max_batch`` in 2D, 1 / 1 / min(4, ``max_batch``) in 3D (volumes are large)."""
    if patch_size is None or len(patch_size) != spatial_dims:
        patch_size = (224, 224) if spatial_dims == 2 else (96, 96, 96)
    opt = tuple(_round_up(int(s), divisor) for s in patch_size)
    cap = max(divisor, MAX_SIDE // divisor * divisor)
    hi = tuple(max(o, min(2 * o, cap)) for o in opt)
    lo = tuple(divisor for _ in opt)
    batch = (1, min(8, max_batch), max_batch) if spatial_dims == 2 else (1, 1, min(4, max_batch))
    return Bounds(batch, lo, opt, hi)
