"""Verification of an exported graph against PyTorch with ONNX Runtime, with explicit tolerances.

The tolerances are absolute, on float32 outputs in [0, 1] (probabilities) and [0, log K] (entropy). Both
frameworks run float32 kernels that differ only in summation order, which gives differences around 1e-6; 1e-4
leaves two orders of magnitude for deeper models and larger inputs while still catching a wrong operator (a
dropped normalisation or a swapped axis gives differences of 1e-2 and more). Argmax agreement is measured too:
voxels whose two best classes tie within the rounding may flip, so 99.9 % rather than 100 %.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from confkd.errors import VerificationError

__all__ = ["ARGMAX_MIN_AGREEMENT", "ENTROPY_ATOL", "PROBABILITY_ATOL", "CaseResult", "Verification", "verify_onnx"]

logger = logging.getLogger(__name__)

PROBABILITY_ATOL = 1e-4
ENTROPY_ATOL = 1e-4
ARGMAX_MIN_AGREEMENT = 0.999


@dataclass(frozen=True)
class CaseResult:
    """One verification input: its name and shape, and how far ONNX Runtime was from PyTorch on it."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff_probabilities: float
    max_abs_diff_entropy: float
    argmax_agreement: float

    @property
    def ok(self) -> bool:
        return (
            self.max_abs_diff_probabilities <= PROBABILITY_ATOL
            and self.max_abs_diff_entropy <= ENTROPY_ATOL
            and self.argmax_agreement >= ARGMAX_MIN_AGREEMENT
        )


@dataclass(frozen=True)
class Verification:
    """All cases, and the summary stored in the manifest."""

    cases: tuple[CaseResult, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def summary(self) -> dict[str, Any]:
        return {
            "runtime": "onnxruntime CPUExecutionProvider",
            "tolerances": {
                "probabilities_max_abs": PROBABILITY_ATOL,
                "entropy_max_abs": ENTROPY_ATOL,
                "argmax_min_agreement": ARGMAX_MIN_AGREEMENT,
            },
            "max_abs_diff_probabilities": max(c.max_abs_diff_probabilities for c in self.cases),
            "max_abs_diff_entropy": max(c.max_abs_diff_entropy for c in self.cases),
            "min_argmax_agreement": min(c.argmax_agreement for c in self.cases),
            "cases": [{**asdict(c), "shape": list(c.shape)} for c in self.cases],
        }


def verify_onnx(
    onnx_path: Path, reference: nn.Module, inputs: Sequence[tuple[str, torch.Tensor]], *, input_name: str = "image"
) -> Verification:
    """Run ``inputs`` through ``reference`` (PyTorch, returning (probabilities, entropy)) and the ONNX file.

    Raises:
        VerificationError: any case beyond the tolerances; the message names the case, the shape and the numbers.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    results = []
    for name, x in inputs:
        with torch.inference_mode():
            t_probs, t_entropy = (t.numpy() for t in reference(x))
        o_probs, o_entropy = session.run(None, {input_name: np.ascontiguousarray(x.numpy())})
        agreement = float(np.mean(np.argmax(o_probs, axis=1) == np.argmax(t_probs, axis=1)))
        results.append(
            CaseResult(
                name=name,
                shape=tuple(int(s) for s in x.shape),
                max_abs_diff_probabilities=float(np.max(np.abs(o_probs - t_probs))),
                max_abs_diff_entropy=float(np.max(np.abs(o_entropy - t_entropy))),
                argmax_agreement=agreement,
            )
        )
        logger.info("verified %s %s: %s", name, tuple(x.shape), results[-1])
    verification = Verification(tuple(results))
    bad = [c for c in verification.cases if not c.ok]
    if bad:
        details = "; ".join(
            f"{c.name} {list(c.shape)}: max |dp| {c.max_abs_diff_probabilities:.2e}, max |dH| "
            f"{c.max_abs_diff_entropy:.2e}, argmax agreement {c.argmax_agreement:.4%}"
            for c in bad
        )
        raise VerificationError(
            f"{onnx_path}: ONNX Runtime disagrees with PyTorch beyond the tolerances (probabilities "
            f"{PROBABILITY_ATOL}, entropy {ENTROPY_ATOL}, argmax >= {ARGMAX_MIN_AGREEMENT:.1%}): {details}"
        )
    return verification
