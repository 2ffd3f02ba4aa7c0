"""The ACDC ablation of docs/results.md: every method variant, N = 3 and N = 7 strong patients, one budget.

    python benchmarks/acdc_ablation.py ../shared/data/acdc --out runs/ablation --device cuda --iterations 3000
    python benchmarks/acdc_ablation.py DATASET --out DIR --device cuda --budget-s 300   # fit a wall-clock budget
    python benchmarks/acdc_ablation.py --report DIR                                     # rebuild the tables

Runs (``--only`` picks some by name): for N in (3, 7) the presets ``lower_bound``, ``single_branch_mixed``,
``decoupled``, ``entropy_only``, ``kl_only``, ``kl_pseudo`` and ``confkd`` with the expert scribbles; the
``upper_bound`` once (it uses every train patient's dense label, so N does not apply); and with N = 3 the
paper-faithful erosion seeds of every class for ``confkd`` and ``decoupled``. Each run is one ``confkd train``
process; ``--jobs`` of them run at once (on one GPU they share it).

Budget: ``--iterations K`` gives every run K steps. ``--budget-s S`` first trains every run for
``--calibrate-steps`` steps, measures the slowest run's step rate with all of them running, and then resumes
them all (exact resume) to the same K that fits S seconds. Either way, every variant gets the same steps, batch
(48 slices) and seed.

Scoring: the final weights (``checkpoint_last.pt``; no checkpoint selection on the val split, which is also the
split reported) predict every val volume whole on its own grid; 3D Dice and HD95 (mm) per class per volume go to
``RUN/val_per_case.csv``; mean ± std over the volumes to ``DIR/results.json`` and ``DIR/results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
VARIANTS = ("lower_bound", "single_branch_mixed", "decoupled", "entropy_only", "kl_only", "kl_pseudo", "confkd")
CLASSES = ("RV", "MYO", "LV")


def plan(regimes: tuple[int, ...] = (3, 7)) -> dict[str, dict[str, Any]]:
    """Run name -> preset, strong patients and weak-label source."""
    runs: dict[str, dict[str, Any]] = {}
    for n in regimes:
        for preset in VARIANTS:
            runs[f"n{n}-{preset}"] = {"preset": preset, "n_strong": n, "weak_source": "scribbles"}
    runs["upper_bound"] = {"preset": "upper_bound", "n_strong": None, "weak_source": "scribbles"}
    for preset in ("decoupled", "confkd"):
        runs[f"n3-erosion-{preset}"] = {"preset": preset, "n_strong": 3, "weak_source": "erosion"}
    return runs


def confkd_executable() -> str:
    """The ``confkd`` console script of this interpreter's environment (``python -m`` from the repository root
    would import the source folder ``confkd/`` without the ``confkd.cli`` mapping of the install)."""
    beside = Path(sys.executable).with_name("confkd")
    found = str(beside) if beside.is_file() else shutil.which("confkd")
    return found or ""


def confkd_command() -> list[str]:
    """How to run the CLI: the console script, else the module with the working directory off ``sys.path``."""
    found = confkd_executable()
    if found:
        return [found]
    code = (
        "import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; from confkd.cli.main import main; main()"
    )
    return [sys.executable, "-c", code]


def train_command(
    dataset: Path, run_dir: Path, spec: dict[str, Any], args: argparse.Namespace, iterations: int, resume: bool
) -> list[str]:
    overrides = [
        f"train.iterations={iterations}",
        f"train.val_every={args.val_every or iterations}",
        f"train.seed={args.seed}",
        "train.log_every=10",
        f"data.weak_source={spec['weak_source']}",
        *args.set,
    ]
    if spec["n_strong"] is not None:
        overrides.append(f"data.n_strong={spec['n_strong']}")
    cmd = [*confkd_command(), "train", str(dataset), "--out", str(run_dir)]
    cmd += ["--config", str(CONFIGS / f"{spec['preset']}.yaml"), "--device", args.device]
    for o in overrides:
        cmd += ["--set", o]
    return [*cmd, "--resume"] if resume else cmd


def run_all(commands: dict[str, list[str]], out: Path, jobs: int, deadline: float | None) -> dict[str, dict[str, Any]]:
    """Run the commands, ``jobs`` at a time; a run still going at ``deadline`` is stopped (SIGINT, then kill)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, min(jobs, len(commands))))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    pending = list(commands.items())
    running: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
    status: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            log = (out / f"{name}.log").open("ab")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
        time.sleep(0.5)
        for name, (proc, start, log) in list(running.items()):
            late = deadline is not None and time.time() > deadline
            if late and proc.poll() is None:
                proc.send_signal(2)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if proc.poll() is not None:
                log.close()
                status[name] = {"rc": proc.returncode, "seconds": time.time() - start, "stopped_at_deadline": late}
                del running[name]
                print(f"  {name}: rc {proc.returncode} in {status[name]['seconds']:.0f} s", flush=True)
    return status


def steps_per_second(run_dir: Path, batch: int) -> float:
    """The step rate of the last ``train`` record in ``metrics.jsonl`` (0 when there is none)."""
    rate = 0.0
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("images_per_s"):
                rate = rec["images_per_s"] / batch
    return rate


def last_step(run_dir: Path) -> int:
    step = 0
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            step = max(step, int(json.loads(line).get("step", 0)))
    return step


# ---------------------------------------------------------------------------------------------- scoring


def evaluate_run(dataset: Path, run_dir: Path, device: str, checkpoint: str = "checkpoint_last.pt") -> dict[str, Any]:
    """Score ``run_dir/checkpoint`` (the student branch) on every val volume; writes ``val_per_case.csv``."""
    import numpy as np

    from confkd.data.dataset import NnUNetDataset
    from confkd.data.manifest import build_manifest_from_config
    from confkd.training.checkpoint import build_model_from_checkpoint, load_checkpoint
    from confkd.training.distributed import resolve_amp, resolve_device
    from confkd.training.validation import read_validation_cases, score_cases

    ckpt = load_checkpoint(run_dir / checkpoint)
    model, config = build_model_from_checkpoint(ckpt)
    dev = resolve_device(device)
    model.to(dev)
    manifest = build_manifest_from_config(NnUNetDataset.open(dataset), config.data)
    cases = read_validation_cases(manifest, config.data.val_split, config.preprocess)
    amp = resolve_amp(config.train.amp, dev)
    scores = score_cases(model, cases, config, dev, amp, batch_size=16, branches=("student",))["student"]
    classes = list(range(1, config.model.num_classes))
    names = ckpt["labels"]["names"]
    rows = []
    for case, m in zip(cases, scores, strict=True):
        row: dict[str, Any] = {"case": case.name}
        for c in classes:
            row[f"dice_{names[c]}"] = m.dice[c]
            row[f"hd95_{names[c]}"] = m.hd95[c]
        row["dice_mean"] = float(np.mean([m.dice[c] for c in classes]))
        finite = [m.hd95[c] for c in classes if math.isfinite(m.hd95[c])]
        row["hd95_mean"] = float(np.mean(finite)) if finite else math.nan
        rows.append(row)
    with (run_dir / "val_per_case.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return summarize_rows(rows) | {"checkpoint": checkpoint, "step": int(ckpt.get("step", 0))}


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and population std over the volumes of every column; HD95 over the volumes where it is defined."""
    import numpy as np

    out: dict[str, Any] = {"volumes": len(rows)}
    for key in rows[0]:
        if key == "case":
            continue
        values = np.array([float(r[key]) for r in rows])
        finite = values[np.isfinite(values)]
        out[key] = {
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "undefined": int(values.size - finite.size),
        }
    return out


# ---------------------------------------------------------------------------------------------- report

ROW_ORDER = ("lower_bound", "single_branch_mixed", "decoupled", "entropy_only", "kl_only", "kl_pseudo", "confkd")
LABELS = {
    "lower_bound": "Lower bound (strong only, single branch)",
    "single_branch_mixed": "Single branch, CE + pCE",
    "decoupled": "Decoupled (dual branch, no KL)",
    "entropy_only": "Entropy only (no KL)",
    "kl_only": "KL only",
    "kl_pseudo": "KL + pseudo-mask",
    "confkd": "**KL + entropy (ConfKD)**",
    "upper_bound": "Upper bound (all dense, single branch)",
}


def _cell(stat: dict[str, Any] | None, digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return text + (f" ({stat['undefined']} undef.)" if stat.get("undefined") else "")


def table(results: dict[str, Any], prefix: str, names: list[str]) -> str:
    head = "| Method | RV Dice | MYO Dice | LV Dice | Mean Dice | Mean HD95 (mm) |\n|---|---|---|---|---|---|\n"
    lines = []
    for name in names:
        r = results["runs"].get(name, {}).get("val")
        label = LABELS[name.split("-")[-1]] if name != "upper_bound" else LABELS["upper_bound"]
        if r is None:
            lines.append(f"| {label} | missing | | | | |")
            continue
        if r.get("step") != results["iterations"]:  # stopped early (the hard deadline): say so in the row
            label += f" † (step {r.get('step')})"
        cells = [_cell(r.get(f"dice_{c}"), 3) for c in CLASSES]
        lines.append(f"| {label} | {' | '.join(cells)} | {_cell(r['dice_mean'], 3)} | {_cell(r['hd95_mean'], 1)} |")
    return head + "\n".join(lines) + "\n"


def write_report(out: Path) -> str:
    results = json.loads((out / "results.json").read_text())
    parts = []
    ran = set(results["runs"])
    for n in (3, 7):
        names = [f"n{n}-{v}" for v in ROW_ORDER] + ["upper_bound"]
        if ran & set(names[:-1]):
            title = f"### N = {n} strong patients (scribbles for the other {70 - n})\n\n"
            parts.append(title + table(results, "", [x for x in names if x in ran]))
    names = [x for x in ("n3-erosion-decoupled", "n3-erosion-confkd") if x in ran]
    if names:
        parts.append("### N = 3, erosion seeds of every class instead of scribbles\n\n" + table(results, "", names))
    text = "\n".join(parts)
    (out / "results.md").write_text(text)
    return text


def strip_checkpoints(out: Path, names: list[str], dest: Path) -> None:
    """``out/NAME/checkpoint_last.pt`` without the optimiser and RNG state, as ``dest/NAME.pt`` (weights + config)."""
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = out / name / "checkpoint_last.pt"
        if not path.is_file():
            print(f"{path}: missing")
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt.pop("train", None)
        torch.save(ckpt, dest / f"{name}.pt")


# ---------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, help="steps per run (default: fit --budget-s)")
    parser.add_argument("--budget-s", type=float, help="wall-clock seconds for all the training")
    parser.add_argument("--calibrate-steps", type=int, default=40)
    parser.add_argument("--max-iterations", type=int, default=20000)
    parser.add_argument("--val-every", type=int, default=0, help="validate every so many steps (0: at the end)")
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument(
        "--fallback-set", action="append", default=[], help="overrides to retry with if every calibration run fails"
    )
    parser.add_argument(
        "--strip", nargs="+", metavar="RUN", help="with --out: copy RUN/checkpoint_last.pt without its train state"
    )
    parser.add_argument("--to", type=Path, help="--strip: destination folder (NAME.pt)")
    parser.add_argument("--report", type=Path, help="rebuild results.md from DIR/results.json and stop")
    parser.add_argument("--evaluate-one", nargs=2, metavar=("DATASET", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        print(write_report(args.report))
        return 0
    if args.strip:
        strip_checkpoints(args.out, args.strip, args.to)
        return 0
    if args.evaluate_one:
        result = evaluate_run(Path(args.evaluate_one[0]), Path(args.evaluate_one[1]), args.device)
        print(json.dumps(result))
        return 0
    if args.dataset is None or args.out is None or (args.iterations is None and args.budget_s is None):
        parser.error("DATASET, --out and one of --iterations / --budget-s are required")
    t0 = time.time()
    runs = plan()
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or len(runs)
    batch = 48
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    if args.iterations is not None:
        iterations = args.iterations
        phases = {}
    else:
        calib = args.calibrate_steps
        print(f"calibrating: {len(runs)} runs x {calib} steps, {jobs} at a time", flush=True)
        cmds = {n: train_command(args.dataset, out / n, s, args, calib, False) for n, s in runs.items()}
        status = run_all(cmds, out, jobs, None)
        if args.fallback_set and all(st["rc"] != 0 for st in status.values()):
            print(f"every calibration run failed; again with {args.fallback_set}", flush=True)
            for name in runs:
                shutil.rmtree(out / name, ignore_errors=True)
            args.set = [*args.set, *args.fallback_set]
            cmds = {n: train_command(args.dataset, out / n, s, args, calib, False) for n, s in runs.items()}
            status = run_all(cmds, out, jobs, None)
        spent = time.time() - t0
        rates = {n: steps_per_second(out / n, batch) for n in runs if status[n]["rc"] == 0}
        slowest = min(rates.values()) if rates else 0.0
        longest = max(s["seconds"] for s in status.values())
        setup = longest - calib / slowest if slowest > 0 else longest  # start-up, data loading, final validation
        left = args.budget_s - spent - max(setup, 0.0)
        iterations = calib + int(0.9 * slowest * left) if slowest > 0 else calib
        iterations = max(calib, min(args.max_iterations, iterations // 50 * 50))
        phases = {"calibration_s": spent, "rates_steps_per_s": rates, "setup_s": setup}
        if not args.val_every:  # a checkpoint half-way, in case the hard deadline stops a run
            args.val_every = max(calib, iterations // 2)
        print(f"slowest {slowest:.2f} steps/s, setup {setup:.0f} s -> {iterations} iterations per run", flush=True)
    results["iterations"] = iterations
    results["phases"] = phases
    resume = args.iterations is None
    cmds = {n: train_command(args.dataset, out / n, s, args, iterations, resume) for n, s in runs.items()}
    t_train = time.time()
    deadline = t0 + args.budget_s + 10 if args.budget_s else None  # a hard stop: the estimate keeps a 10% margin
    status = run_all(cmds, out, jobs, deadline)
    results["train_s"] = time.time() - t_train
    print(f"training done in {results['train_s']:.0f} s; scoring", flush=True)
    evals = {}
    for name in runs:
        if (out / name / "checkpoint_last.pt").is_file():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--evaluate-one"]
            evals[name] = [*cmd, str(args.dataset), str(out / name)]
    eval_status = run_all(evals, out, min(jobs, 8), None)
    for name, spec in runs.items():
        entry: dict[str, Any] = {**spec, **status.get(name, {}), "steps": last_step(out / name)}
        entry["images_per_s"] = steps_per_second(out / name, batch) * batch
        log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines() if name in evals else []
        if eval_status.get(name, {}).get("rc") == 0 and log:
            entry["val"] = json.loads(log[-1])
        results["runs"][name] = entry
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(write_report(out))
    print(f"total {results['seconds']:.0f} s, {iterations} iterations per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
