"""The benchmark entry point runs end to end at tiny sizes (speed itself is measured by the benchmark, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["net"]) == {"torch-eager", "torch-channels-last", "onnxruntime"}
    for backend in ("torch", "onnxruntime"):
        assert results["e2e"][backend]["ok"] == 3
        assert results["peer"][backend]["scans_per_s"] > 0
    assert results["scale"][0]["shape"] == [64, 64, 8]
    assert "e2e_vs_peer[onnxruntime]" in results["ratios"]
    assert "ratios" in proc.stdout
