"""``import confkd`` stays light: no CLI, ONNX Runtime or TensorRT at import time (STYLE.md habit 2)."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


def test_import_confkd_is_light() -> None:
    mods = _modules_after("import confkd, confkd.config, confkd.data, confkd.training")
    for heavy in ("typer", "onnxruntime", "tensorrt", "onnx", "rich"):
        assert heavy not in mods, f"`import confkd` imported {heavy}"


def test_cli_help_does_not_import_torch() -> None:
    mods = _modules_after("import confkd.cli.main")
    assert "torch" not in mods
    assert "onnxruntime" not in mods and "tensorrt" not in mods


def test_cli_info_does_not_import_torch() -> None:
    mods = _modules_after(
        "from confkd.data.describe import describe_volume; from confkd.data.volume import read_volume"
    )
    assert "torch" not in mods


def test_lazy_data_exports_resolve() -> None:
    import confkd.data

    for name in confkd.data.__all__:
        assert getattr(confkd.data, name) is not None


def test_inference_model_and_runners_do_not_import_onnxruntime_or_tensorrt() -> None:
    mods = _modules_after(
        "import confkd.inference.model, confkd.inference.runners_onnx, confkd.inference.runners_trt, "
        "confkd.inference.manifest"
    )
    assert "onnxruntime" not in mods and "tensorrt" not in mods
    assert not any(m == "confkd.export" or m.startswith("confkd.export.") for m in mods)  # never confkd -> export


def test_export_tensorrt_modules_import_without_tensorrt() -> None:
    mods = _modules_after("import confkd.export.tensorrt, confkd.export.engine_cache")
    assert "tensorrt" not in mods
