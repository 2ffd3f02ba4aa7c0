"""confkd export --triton: the model repository's layout, its config parsed back with Triton's own ModelConfig
protobuf (shipped in tritonclient) and checked against the manifest, and the refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.errors import ConfigError, ExportError, ManifestError
from confkd.export.triton import (
    CONFIG_FILE,
    CPU_CONFIG,
    MANIFEST_COPY,
    parse_config,
    triton_config,
    write_triton_repository,
)
from confkd.inference.manifest import Bounds, file_sha256, load_manifest
from confkd.inference.runners_triton import HASH_PARAMETER, check_model_name, config_problems, sanitize_model_name

cli = CliRunner()


def _copy(exported: tuple[Path, Path], tmp_path: Path) -> Path:
    # the session fixture's folder is shared with tests that list its contents: write into a copy
    return Path(shutil.copytree(exported[1], tmp_path / "model"))


def _triton_json(manifest: Any, **overrides: Any) -> dict[str, Any]:
    """A config as Triton's ``v2/models/NAME/config`` returns it (numbers for dims), built by hand."""
    config: dict[str, Any] = {
        "name": "m",
        "platform": "onnxruntime_onnx",
        "max_batch_size": manifest.bounds.batch[2],
        "input": [{"name": "image", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [1, -1, -1]}],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [4, -1, -1]},
            {"name": "entropy", "data_type": "TYPE_FP32", "dims": [-1, -1]},
        ],
        "parameters": {HASH_PARAMETER: {"string_value": manifest.onnx_sha256}},
    }
    config.update(overrides)
    return config


def test_export_cli_writes_a_triton_repository(exported: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = exported
    out = tmp_path / "seg model"  # a space: the default model name is sanitised
    result = cli.invoke(app, ["export", str(ckpt), "--out", str(out), "--triton"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    folder = out / "triton" / "seg_model"
    files = sorted(str(p.relative_to(out / "triton")) for p in (out / "triton").rglob("*") if p.is_file())
    assert files == [
        "seg_model/1/model.onnx",
        "seg_model/config.pbtxt",
        "seg_model/configs/cpu.pbtxt",
        "seg_model/confkd_manifest.json",
    ]
    # byte copies: the served graph is the verified one, and the manifest travels with it
    assert (folder / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert file_sha256(folder / "1" / "model.onnx") == manifest.onnx_sha256
    assert (folder / MANIFEST_COPY).read_bytes() == (out / "manifest.json").read_bytes()
    text = (folder / CONFIG_FILE).read_text()
    assert 'name: "seg_model"' in text and 'platform: "onnxruntime_onnx"' in text
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "triton"]  # no temporary left


def test_config_parses_as_triton_model_config_and_matches_the_manifest(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("tritonclient")
    model_dir = _copy(exported, tmp_path)
    repo = write_triton_repository(model_dir, model_name="tiny")
    manifest = load_manifest(model_dir)
    parsed = parse_config(repo.config_path.read_text())
    assert parsed is not None
    lo, opt, hi = manifest.bounds.batch
    assert (lo, opt, hi) == (1, 8, 32)
    # the whole config, field by field (protobuf's JSON mapping writes int64 values as strings)
    assert parsed == {
        "name": "tiny",
        "platform": "onnxruntime_onnx",
        "max_batch_size": hi,
        "input": [{"name": "image", "data_type": "TYPE_FP32", "dims": ["1", "-1", "-1"]}],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["4", "-1", "-1"]},
            {"name": "entropy", "data_type": "TYPE_FP32", "dims": ["-1", "-1"]},
        ],
        "dynamic_batching": {"preferred_batch_size": [opt, hi], "max_queue_delay_microseconds": "1000"},
        "instance_group": [{"count": 1, "kind": "KIND_GPU"}],
        "parameters": {HASH_PARAMETER: {"string_value": manifest.onnx_sha256}},
    }
    assert config_problems(parsed, manifest) == []
    cpu = parse_config((repo.root / "tiny" / CPU_CONFIG).read_text())
    assert cpu is not None and cpu["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert {k: v for k, v in cpu.items() if k != "instance_group"} == {
        k: v for k, v in parsed.items() if k != "instance_group"
    }


def test_plan_and_3d_configs_parse(exported: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("tritonclient")
    model_dir = _copy(exported, tmp_path)
    # the engine's bytes are opaque to the repository writer: any bytes stand for a plan here
    repo = write_triton_repository(model_dir, model_name="tiny_trt", plan=b"engine bytes", compute_capability="sm_90")
    assert repo.platform == "tensorrt_plan" and repo.model_path.name == "model.plan"
    assert repo.model_path.read_bytes() == b"engine bytes"
    assert not (repo.root / "tiny_trt" / "configs").exists()  # a plan never runs on a CPU instance
    parsed = parse_config(repo.config_path.read_text())
    assert parsed is not None and parsed["platform"] == "tensorrt_plan"
    assert parsed["cc_model_filenames"] == {"9.0": "model.plan"}
    # a 3D model: one more dynamic axis everywhere, batch 1/1/4 -> one preferred size
    manifest = load_manifest(model_dir)
    three_d = dataclasses.replace(
        manifest, spatial_dims=3, bounds=Bounds((1, 1, 4), (4, 4, 4), (96, 96, 96), (192, 192, 192))
    )
    parsed_3d = parse_config(triton_config(three_d, "vol"))
    assert parsed_3d is not None
    assert parsed_3d["input"][0]["dims"] == ["1", "-1", "-1", "-1"]
    assert parsed_3d["output"][1]["dims"] == ["-1", "-1", "-1"]
    assert parsed_3d["max_batch_size"] == 4 and parsed_3d["dynamic_batching"]["preferred_batch_size"] == [4]
    assert config_problems(parsed_3d, three_d) == []


def test_config_problems_name_each_mismatch(exported: tuple[Path, Path]) -> None:
    manifest = load_manifest(exported[1])
    assert config_problems(_triton_json(manifest), manifest) == []
    assert config_problems(_triton_json(manifest, parameters={}), manifest) == []  # a hand-written config
    cases = {
        "max_batch_size is 0": _triton_json(manifest, max_batch_size=0),
        "input 'image' has dims [4, -1, -1], expected [1, -1, -1]": _triton_json(
            manifest, input=[{"name": "image", "data_type": "TYPE_FP32", "dims": [4, -1, -1]}]
        ),
        "input 'image' is TYPE_FP16": _triton_json(
            manifest, input=[{"name": "image", "data_type": "TYPE_FP16", "dims": [1, -1, -1]}]
        ),
        "no input 'image'": _triton_json(manifest, input=[{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}]),
        "no output 'probabilities'": _triton_json(manifest, output=[]),
        "output 'probabilities' has dims [4, 256, 256]": _triton_json(
            manifest, output=[{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [4, 256, 256]}]
        ),
        "a different export": _triton_json(manifest, parameters={HASH_PARAMETER: {"string_value": "0" * 64}}),
    }
    for expected, config in cases.items():
        problems = config_problems(config, manifest)
        assert any(expected in p for p in problems), (expected, problems)


def test_refusals(exported: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = exported
    model_dir = _copy(exported, tmp_path)
    write_triton_repository(model_dir)
    with pytest.raises(ExportError, match="already exists"):
        write_triton_repository(model_dir)
    with pytest.raises(ConfigError, match="directory name"):
        check_model_name("a/b")
    assert sanitize_model_name("a/b c") == "a_b_c" and sanitize_model_name("...") == "confkd"
    tampered = Path(shutil.copytree(exported[1], tmp_path / "tampered"))
    with (tampered / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="modified after export"):
        write_triton_repository(tampered)
    assert not (tampered / "triton").exists()
    # the CLI checks the name before the (slow) export and leaves nothing behind
    result = cli.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "o"), "--triton", "--triton-name", "a/b"])
    assert result.exit_code == 2 and "--triton-name" in result.output and not (tmp_path / "o").exists()
    result = cli.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "o"), "--triton-name", "x"])
    assert result.exit_code == 2 and "needs --triton" in result.output and not (tmp_path / "o").exists()


def test_tritonclient_is_imported_lazily() -> None:
    code = (
        "import json, sys; import confkd.export.triton, confkd.inference.runners_triton, confkd.inference.model; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    mods = set(
        json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    )
    assert not any(m.split(".")[0] in ("tritonclient", "gevent", "geventhttpclient") for m in mods)
