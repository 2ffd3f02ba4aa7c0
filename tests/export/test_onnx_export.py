"""confkd export: a tiny random-weight checkpoint -> verified ONNX + manifest; teacher-free; strict manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from confkd.config import config_from_dict
from confkd.errors import ExportError, ManifestError, VerificationError
from confkd.export import onnx_export
from confkd.export.manifest import default_bounds, metadata_from_props
from confkd.export.onnx_export import export_model, load_student
from confkd.inference.manifest import load_manifest, manifest_from_dict
from confkd.inference.model import load_model
from confkd.training.network import count_parameters, create_model


def test_export_passes_checker_and_verification(exported: tuple[Path, Path]) -> None:
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    manifest = load_manifest(out)
    v = manifest.verification
    assert v["max_abs_diff_probabilities"] <= 1e-4 and v["max_abs_diff_entropy"] <= 1e-4
    assert v["min_argmax_agreement"] >= 0.999
    shapes = {tuple(c["shape"]) for c in v["cases"]}
    assert len({s[0] for s in shapes}) == 2 and len({s[2:] for s in shapes}) == 2  # two batches, two sizes
    assert {c["name"] for c in v["cases"]} == {"random", "phantom"}


def test_graph_has_named_io_dynamic_axes_and_no_teacher(exported: tuple[Path, Path]) -> None:
    ckpt, out = exported
    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probabilities", "entropy"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    assert not any("teacher" in i.name for i in model.graph.initializer)
    student, _ = load_student(ckpt)
    values = onnx_export.check_no_teacher(model, student, "x")
    full = create_model(config_from_dict(torch.load(ckpt, weights_only=True)["config"]).model, 2)
    assert values <= sum(t.numel() for t in student.state_dict().values()) < count_parameters(full)


def test_teacher_weights_in_the_graph_are_refused(exported: tuple[Path, Path]) -> None:
    ckpt, out = exported
    model = onnx.load(str(out / "model.onnx"))
    student, _ = load_student(ckpt)
    renamed = onnx.load(str(out / "model.onnx"))
    renamed.graph.initializer[0].name = "teacher.head.weight"
    with pytest.raises(ExportError, match="teacher weights"):
        onnx_export.check_no_teacher(renamed, student, "x")
    extra = onnx.numpy_helper.from_array(np.zeros(10_000, np.float32), "decoder_extra")
    model.graph.initializer.append(extra)
    with pytest.raises(ExportError, match="besides the student"):
        onnx_export.check_no_teacher(model, student, "x")


def test_metadata_matches_manifest(exported: tuple[Path, Path]) -> None:
    _, out = exported
    meta = metadata_from_props({p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props})
    manifest = json.loads((out / "manifest.json").read_text())
    assert meta == {k: v for k, v in manifest.items() if k not in ("onnx_sha256", "verification")}
    assert manifest["labels"] == {"names": ["background", "RV", "MYO", "LV"], "values": [0, 1, 2, 3], "ignore_index": 4}
    assert manifest["bounds"] == {"batch": [1, 8, 32], "spatial": {"min": [4, 4], "opt": [64, 64], "max": [128, 128]}}
    assert manifest["preprocessing"]["target_spacing"] == [1.5, 1.5] and manifest["opset"] == 17
    assert set(manifest["versions"]) == {"model", "confkd", "torch", "onnx"}


def test_manifest_is_strict_and_hash_checked(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = exported
    data = json.loads((out / "manifest.json").read_text())
    with pytest.raises(ManifestError, match=r"unknown field\(s\) colour; valid fields are: format"):
        manifest_from_dict({**data, "colour": "red"})
    with pytest.raises(ManifestError, match=r"missing field\(s\) opset"):
        manifest_from_dict({k: v for k, v in data.items() if k != "opset"})
    with pytest.raises(ManifestError, match="multiple of 4"):
        manifest_from_dict(
            {**data, "bounds": {"batch": [1, 1, 2], "spatial": {"min": [4, 4], "opt": [6, 8], "max": [8, 8]}}}
        )
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    raw = bytearray((copy / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte in the weights
    (copy / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="modified after export"):
        load_manifest(copy)
    with pytest.raises(ManifestError, match="modified after export"):
        load_model(copy, backend="onnxruntime", device="cpu")


def test_verification_failure_leaves_no_model_dir(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = exported
    real_save = onnx.save

    def corrupt_then_save(model: onnx.ModelProto, path: str) -> None:
        init = next(i for i in model.graph.initializer if len(i.dims) == 4)
        array = onnx.numpy_helper.to_array(init).copy()
        init.CopyFrom(onnx.numpy_helper.from_array(array * 1.5, init.name))  # one conv's weights off by 50 %
        real_save(model, path)

    monkeypatch.setattr(onnx, "save", corrupt_then_save)
    with pytest.raises(VerificationError, match="disagrees with PyTorch beyond the tolerances"):
        export_model(ckpt, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []  # neither MODEL_DIR nor its temporary sibling


def test_existing_out_is_refused(exported: tuple[Path, Path]) -> None:
    ckpt, out = exported
    with pytest.raises(ExportError, match="already exists"):
        export_model(ckpt, out)


def test_default_bounds() -> None:
    b = default_bounds(2, 16, (224, 200))
    assert b.opt_spatial == (224, 208) and b.max_spatial == (448, 416) and b.min_spatial == (16, 16)
    assert default_bounds(2, 16, (400, 400)).max_spatial == (512, 512)  # capped
    b3 = default_bounds(3, 8, None)
    assert b3.opt_spatial == (96, 96, 96) and b3.batch == (1, 1, 4)
