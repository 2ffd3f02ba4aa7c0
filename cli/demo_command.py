"""``confkd demo``: the whole workflow on synthetic phantoms, with no data and no download.

phantoms (a few strong patients, the rest with scribbles) -> train a small ConfKD model on the CPU -> export the
student to ONNX (verified against torch) -> segment the held-out phantoms with it through ONNX Runtime -> score them
against their labels and summarise the confidence maps.
Each step is one library call, the same ones ``phantoms``, ``train``, ``segment`` and ``evaluate`` make.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from confkd.cli._common import console, fail, quiet_info_logs, resolve_config, show_table
from confkd.errors import ConfKDError

if TYPE_CHECKING:
    from confkd.config import Config

# small enough for about two minutes on a laptop CPU, big enough for the student to learn the anatomy
DEMO_OVERRIDES = [
    "name=confkd-demo",
    "data.n_strong=2",
    "model.width=8",
    "model.depth=3",
    "train.strong_per_batch=4",
    "train.weak_per_batch=12",
    "train.lr=0.002",
    "train.val_every=100",
    "train.log_every=25",
]


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes.")] = Path(
        "confkd_demo"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the phantoms and of training.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Synthesise phantoms, train a small ConfKD model, segment held-out scans and report Dice and confidence."""
    if out.exists() and any(out.iterdir()):
        fail(f"{out}: folder exists and is not empty; choose a new --out or delete it")
    started = time.perf_counter()
    # the defaults are the method (configs/confkd.yaml): dual branch, KL weight 1, entropy weight 0.1
    cfg = resolve_config(None, [*DEMO_OVERRIDES, f"train.iterations={steps}", f"train.seed={seed}"])
    with quiet_info_logs(console.is_terminal):
        _run(out, cfg, steps, seed, device, started)


def _run(out: Path, cfg: Config, steps: int, seed: int, device: str, started: float) -> None:
    from confkd.data.phantoms import write_phantom_dataset
    from confkd.evaluation import evaluate_folder
    from confkd.export.onnx_export import export_model
    from confkd.inference.inputs import resolve_inputs
    from confkd.inference.model import load_model
    from confkd.inference.pipeline import run_batch
    from confkd.inference.report import load_reports
    from confkd.training.trainer import train

    try:
        console.print(
            f"[bold]1/5[/] phantoms: 10 train patients (2 strong, 8 with scribbles), 3 val, 6 test -> {out}/data"
        )
        data = write_phantom_dataset(out / "data", n_train=10, n_val=3, n_test=6, size=(96, 96), seed=seed)
        console.print(f"[bold]2/5[/] training ConfKD for {steps} steps on {device} -> {out}/run")
        if console.is_terminal:
            from confkd.cli.train_commands import RichProgress

            with RichProgress() as progress:
                result = train(data, cfg, out / "run", device=device, callback=progress)
        else:
            result = train(data, cfg, out / "run", device=device)
        console.print(f"      {result.images_per_s:.0f} images/s, best student val Dice {result.best_metric or 0:.3f}")
        exported = export_model(result.best_checkpoint, out / "model")
        v = exported.verification.summary()
        console.print(
            f"[bold]3/5[/] exported the student (teacher stripped) to ONNX -> {out}/model; ONNX Runtime vs torch: "
            f"max |dp| {v['max_abs_diff_probabilities']:.1e}, argmax agreement {100 * v['min_argmax_agreement']:.2f} %"
        )
        console.print(f"[bold]4/5[/] segmenting the 6 held-out phantoms with the exported student -> {out}/segment")
        model = load_model(exported.model_dir, backend="onnxruntime", device=device)
        batch = run_batch(resolve_inputs([data / "imagesTs"]), out / "segment", model, preview=True)
        console.print("[bold]5/5[/] scoring against the held-out labels")
        evaluation = evaluate_folder(out / "segment", data / "labelsTs", dataset_json=data / "dataset.json")
    except ConfKDError as e:
        fail(str(e))
    dice, hd = evaluation.summary["dice"], evaluation.summary["hd95"]
    keys: list[int | str] = [*evaluation.classes, "mean"]
    rows = [
        [evaluation.classes[k] if isinstance(k, int) else "mean", f"{dice[k].mean:.3f}", f"{hd[k].mean:.1f}"]
        for k in keys
    ]
    show_table(["class", "Dice", "HD95 mm"], rows)
    reports = load_reports(out / "segment")
    conf = [r["foreground"]["mean_confidence"] for r in reports.values() if r["foreground"]["voxels"]]
    low = [r["low_confidence"]["fraction"] for r in reports.values()]
    if conf:
        console.print(
            f"confidence (1 - normalised entropy) inside the predicted structures: mean {statistics.fmean(conf):.3f}; "
            f"voxels below 0.5: {100 * statistics.fmean(low):.2f} % on average; flagged cases: {batch.flagged}"
        )
    console.print(
        f"done in {time.perf_counter() - started:.0f} s. Look at {out}/segment (label maps, confidence maps, "
        f"QA reports, previews) and {out}/run (checkpoints, metrics.jsonl)."
    )
