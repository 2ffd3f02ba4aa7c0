"""The default model shipped inside the package: what ``confkd segment`` uses when no ``--model`` is given.

``confkd/models/acdc_cine_confkd/`` holds a ``confkd export`` model directory (``model.onnx`` + ``manifest.json``,
hash-checked on load like any exported model) and its ``MODEL_CARD.md``: a 2D ConfKD student for short-axis cine
MRI (RV, MYO, LV), trained on ACDC with 7 densely labelled and 63 scribble-labelled patients. ACDC is licensed
for research use only (non-commercial), and so is this model. Results and the exact training command are in
docs/results.md.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "bundled_model_dir"]

#: the folder name under ``confkd/models/`` of the default model
DEFAULT_MODEL = "acdc_cine_confkd"


def bundled_model_dir(name: str | None = None) -> Path | None:
    """The bundled model directory ``name`` (default :data:`DEFAULT_MODEL`), or ``None`` when this installation
    does not carry it."""
    folder = Path(str(resources.files("confkd"))) / "models" / (name or DEFAULT_MODEL)
    return folder if (folder / "manifest.json").is_file() and (folder / "model.onnx").is_file() else None
