"""The engine cache without TensorRT: key parts, profile, sidecar checks -> rebuild, folder precedence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confkd.export import engine_cache as ec
from confkd.export.tensorrt import keep_fp32
from confkd.inference.manifest import Bounds, load_manifest

GPU = ("NVIDIA H100 80GB HBM3", "sm_90")
BOUNDS = Bounds((1, 8, 32), (16, 16), (224, 224), (448, 448))


def test_key_changes_with_every_part() -> None:
    profile = ec.profile_from_bounds(BOUNDS, 1)
    assert profile.min_shape == (1, 1, 16, 16) and profile.opt_shape == (8, 1, 224, 224)
    assert profile.max_shape == (32, 1, 448, 448)
    base = ec.engine_key("a" * 64, GPU, "10.3.0", "fp16", profile)
    other_profile = ec.profile_from_bounds(Bounds((1, 8, 16), (16, 16), (224, 224), (448, 448)), 1)
    variants = [
        ec.engine_key("b" * 64, GPU, "10.3.0", "fp16", profile),
        ec.engine_key("a" * 64, ("NVIDIA A100-SXM4-80GB", "sm_80"), "10.3.0", "fp16", profile),
        ec.engine_key("a" * 64, (GPU[0], "sm_89"), "10.3.0", "fp16", profile),
        ec.engine_key("a" * 64, GPU, "10.4.0", "fp16", profile),
        ec.engine_key("a" * 64, GPU, "10.3.0", "fp32", profile),
        ec.engine_key("a" * 64, GPU, "10.3.0", "fp16", other_profile),
    ]
    assert len({base, *variants}) == 7
    assert base == ec.engine_key("a" * 64, GPU, "10.3.0", "fp16", profile)  # deterministic
    with pytest.raises(Exception, match="unknown precision 'int8'"):
        ec.engine_key("a" * 64, GPU, "10.3.0", "int8", profile)


def test_engine_dir_precedence(tmp_path: Path) -> None:
    assert ec.resolve_engine_dir(tmp_path / "x", env={ec.ENV_VAR: "/env"}) == tmp_path / "x"
    assert ec.resolve_engine_dir(None, env={ec.ENV_VAR: "/env"}) == Path("/env")
    default = ec.resolve_engine_dir(None, env={})
    repo = Path(__file__).resolve().parents[2]
    assert default == repo / "trt_engines"  # a source checkout with its cache README
    assert default != ec.resolve_engine_dir(None, env={"XDG_CACHE_HOME": str(tmp_path)}) or default.is_dir()


def test_cache_hit_and_rebuild_on_any_mismatch(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, model_dir = exported
    builds: list[str] = []

    def fake_builder(onnx_path: Path, profile: ec.EngineProfile, precision: str, timing: Path) -> bytes:
        assert onnx_path == model_dir / "model.onnx" and timing.parent == tmp_path
        builds.append(precision)
        return f"engine {precision} {profile.max_shape}".encode()

    def get(**kw: object) -> ec.CachedEngine:
        args = {"precision": "fp16", "engine_dir": tmp_path, "gpu": GPU, "trt_version": "10.3.0"} | kw
        return ec.get_or_build_engine(model_dir, builder=fake_builder, **args)  # type: ignore[arg-type]

    first = get()
    assert first.built and first.path.is_file() and builds == ["fp16"]
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["onnx_sha256"] == load_manifest(model_dir).onnx_sha256 and sidecar["gpu_name"] == GPU[0]
    assert not get().built and len(builds) == 1  # hit
    assert get(trt_version="10.4.0").built  # another TensorRT: another key, built
    assert get(gpu=("NVIDIA L4", "sm_89")).built
    assert get(precision="fp32").built and len(builds) == 4
    # corrupt engine bytes -> rebuild, never load
    first.path.write_bytes(b"truncated")
    assert get().built and first.path.read_bytes() == b"engine fp16 (32, 1, 128, 128)"
    # a foreign sidecar (another GPU written under this key) -> rebuild
    side = first.path.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "gpu_name": "Other GPU"}))
    assert get().built
    side.unlink()  # missing sidecar -> rebuild
    assert get().built and len(builds) == 7


def test_fp16_keeps_norms_and_head_in_fp32() -> None:
    assert keep_fp32("NORMALIZATION", "/network/encoder/InstanceNormalization")
    assert keep_fp32("REDUCE", "/ReduceSum") and keep_fp32("SOFTMAX", "/Softmax")
    assert keep_fp32("ELEMENTWISE", "/Mul_1") or keep_fp32("ELEMENTWISE", "/mul_1")
    assert not keep_fp32("CONVOLUTION", "/network/encoder/stages.0/Conv")


@pytest.mark.trt
def test_build_a_real_engine(exported: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    from confkd.inference.runners_trt import gpu_identity, tensorrt_version

    _, model_dir = exported
    cached = ec.get_or_build_engine(
        model_dir, engine_dir=tmp_path, gpu=gpu_identity(torch.device("cuda")), trt_version=tensorrt_version()
    )
    assert cached.built and cached.path.stat().st_size > 0
