"""The TensorRT engine cache: where it is, what an engine's key is, and "load or rebuild" (trt_engines/README.md).

Everything here but the default builder runs without TensorRT: the GPU identity and TensorRT version are
parameters, so the key, profile and sidecar logic is tested on any machine.

Cache folder, first that applies: ``--engine-dir`` > ``$CONFKD_ENGINE_DIR`` > ``trt_engines/`` of a source checkout
(the folder next to the package source, holding the cache README) > ``$XDG_CACHE_HOME/confkd/trt_engines``
(``~/.cache/confkd/trt_engines``): an installed package's own folder may not be writable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from confkd.errors import ExportError
from confkd.inference.manifest import Bounds, Manifest, canonical_json, load_manifest
from confkd.inference.runners_trt import GpuIdentity, sidecar_problem
from confkd.io_utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "ENV_VAR",
    "PRECISIONS",
    "CachedEngine",
    "EngineProfile",
    "engine_key",
    "engine_provider",
    "get_or_build_engine",
    "profile_from_bounds",
    "resolve_engine_dir",
    "timing_cache_path",
]

logger = logging.getLogger(__name__)

ENV_VAR = "CONFKD_ENGINE_DIR"
PRECISIONS = ("fp32", "fp16")
#: (onnx path, profile, precision, timing cache path) -> serialised engine
Builder = Callable[[Path, "EngineProfile", str, Path], bytes]


def _source_checkout_dir() -> Path | None:
    """``<repo>/trt_engines`` when confkd runs from a source checkout (editable install), else ``None``."""
    import confkd

    repo = Path(confkd.__file__).resolve().parents[1]
    folder = repo / "trt_engines"
    if (repo / "pyproject.toml").is_file() and (folder / "README.md").is_file() and os.access(folder, os.W_OK):
        return folder
    return None


def resolve_engine_dir(engine_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The cache folder (see the module docstring for the precedence); not created here."""
    env = os.environ if env is None else env
    if engine_dir is not None:
        return Path(engine_dir)
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    checkout = _source_checkout_dir()
    if checkout is not None:
        return checkout
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "confkd" / "trt_engines"


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimisation profile for the ``image`` input: full min/opt/max shapes ``[N, C, *spatial]``."""

    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "min": list(self.min_shape),
            "opt": list(self.opt_shape),
            "max": list(self.max_shape),
        }


def profile_from_bounds(bounds: Bounds, in_channels: int, input_name: str = "image") -> EngineProfile:
    """The manifest's declared bounds as an optimisation profile (batch and every spatial axis)."""
    lo, opt, hi = bounds.batch
    return EngineProfile(
        input_name,
        (lo, in_channels, *bounds.min_spatial),
        (opt, in_channels, *bounds.opt_spatial),
        (hi, in_channels, *bounds.max_spatial),
    )


def engine_key(onnx_sha256: str, gpu: GpuIdentity, trt_version: str, precision: str, profile: EngineProfile) -> str:
    """sha256 of everything that makes an engine valid (canonical JSON of the parts)."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; available options are: {', '.join(PRECISIONS)}")
    parts = {
        "onnx_sha256": onnx_sha256,
        "gpu_name": gpu[0],
        "compute_capability": gpu[1],
        "tensorrt_version": trt_version,
        "precision": precision,
        "profile": profile.to_dict(),
    }
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def timing_cache_path(engine_dir: Path, gpu: GpuIdentity, trt_version: str) -> Path:
    """``timing-<gpu>-<trt>.cache``: tactic timings shared by every engine built on this GPU and TensorRT."""
    gpu_slug = "".join(ch if ch.isalnum() else "_" for ch in f"{gpu[0]}_{gpu[1]}")
    return engine_dir / f"timing-{gpu_slug}-{trt_version}.cache"


@dataclass(frozen=True)
class CachedEngine:
    """An engine ready to load: its bytes and files, and whether this call built it."""

    engine: bytes
    path: Path
    sidecar: dict[str, Any]
    built: bool


def get_or_build_engine(
    model_dir: str | Path,
    *,
    precision: str = "fp16",
    engine_dir: str | Path | None = None,
    gpu: GpuIdentity,
    trt_version: str,
    builder: Builder | None = None,
    manifest: Manifest | None = None,
) -> CachedEngine:
    """The cached engine for this model, GPU, TensorRT, precision and profile; built (and cached) when absent.

    A cached engine is loaded only when its sidecar matches the key, the GPU, the TensorRT version and the engine
    bytes' sha256; anything else (stale, foreign, truncated, missing sidecar) is logged and rebuilt, never loaded.
    ``builder`` defaults to :func:`confkd.export.tensorrt.build_engine`.
    """
    model_dir = Path(model_dir)
    manifest = manifest or load_manifest(model_dir)
    profile = profile_from_bounds(manifest.bounds, manifest.in_channels, manifest.input_name)
    key = engine_key(manifest.onnx_sha256, gpu, trt_version, precision, profile)
    folder = resolve_engine_dir(engine_dir)
    path, sidecar_path = folder / f"{key}.engine", folder / f"{key}.json"
    if path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
            engine = path.read_bytes()
            problem = sidecar_problem(sidecar, engine, gpu=gpu, trt_version=trt_version, expected_key=key)
        except (OSError, ValueError) as e:
            problem = f"unreadable sidecar or engine ({e})"
        if problem is None:
            logger.info("engine cache hit: %s", path)
            return CachedEngine(engine, path, sidecar, built=False)
        logger.warning("not loading cached engine %s: %s; rebuilding", path, problem)
    if builder is None:
        from .tensorrt import build_engine

        builder = build_engine
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    engine = builder(model_dir / manifest.model_file, profile, precision, timing_cache_path(folder, gpu, trt_version))
    sidecar = {
        "key": key,
        "onnx_sha256": manifest.onnx_sha256,
        "gpu_name": gpu[0],
        "compute_capability": gpu[1],
        "tensorrt_version": trt_version,
        "precision": precision,
        "profile": profile.to_dict(),
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "manifest": manifest.to_dict(),
    }
    atomic_write_bytes(path, engine)
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")  # last: marks complete
    logger.info("built engine %s in %.1f s", path, time.perf_counter() - start)
    return CachedEngine(engine, path, sidecar, built=True)


def engine_provider(engine_dir: str | Path | None = None) -> Callable[[Path, Manifest, torch.device, str], bytes]:
    """An ``engine_provider`` for :func:`confkd.inference.model.load_model`: this cache on the running GPU."""

    def provide(model_dir: Path, manifest: Manifest, device: torch.device, precision: str) -> bytes:
        from confkd.inference.runners_trt import gpu_identity, tensorrt_version

        return get_or_build_engine(
            model_dir,
            precision=precision,
            engine_dir=engine_dir,
            gpu=gpu_identity(device),
            trt_version=tensorrt_version(),
            manifest=manifest,
        ).engine

    return provide
