"""Commands about models: ``train`` and ``evaluate``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from confkd.cli._common import EXIT_FAILED, console, err_console, fail, quiet_info_logs, resolve_config, show_table
from confkd.errors import ConfKDError

EXIT_INTERRUPTED = 130  # as `segment`: the run stopped on SIGINT / SIGTERM, and can be resumed


class RichProgress:
    """A rich progress bar with the loss terms and throughput; used only when stdout is a terminal."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[terms]}"),
            console=console,
            transient=False,
        )
        self.task: Any = None

    def __enter__(self) -> RichProgress:
        # the bar shows what the INFO lines would: keep them out of the terminal (train.log still gets them)
        self._quiet = quiet_info_logs()
        self._quiet.__enter__()
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
        self._quiet.__exit__(None, None, None)

    def on_step(self, step: int, total_steps: int, terms: dict[str, float], images_per_s: float) -> None:
        text = " ".join(f"{k}={v:.3g}" for k, v in terms.items()) + f" | {images_per_s:.1f} img/s"
        if self.task is None:
            self.task = self.progress.add_task("train", total=total_steps, terms=text)
        self.progress.update(self.task, completed=step, terms=text)

    def on_validation(self, step: int, metrics: dict[str, Any]) -> None:
        student = metrics.get("student", {}).get("mean_dice", math.nan)
        teacher = metrics.get("teacher", {}).get("mean_dice", math.nan)
        self.progress.console.print(f"step {step}: val Dice student {student:.4f}  teacher {teacher:.4f}")


def train(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw dataset folder (with scribblesTr/ and splits.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (config, manifest, checkpoints, metrics).")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config, e.g. configs/confkd.yaml.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
) -> None:
    """Train a ConfKD model (or one of the paper's baselines) on a mixed-supervision dataset."""
    from confkd.training.trainer import TrainingInterrupted
    from confkd.training.trainer import train as run_training

    cfg = resolve_config(config, overrides)
    try:
        if console.is_terminal:
            with RichProgress() as progress:
                result = run_training(dataset, cfg, out, device=device, resume=resume, callback=progress)
        else:
            result = run_training(dataset, cfg, out, device=device, resume=resume)
    except ConfKDError as e:
        fail(str(e))
    except TrainingInterrupted as e:
        hint = _resume_hint(dataset, out, device)
        err_console.print(
            f"interrupted by {e.signal_name} at step {e.step}: {e.checkpoint} written; {hint}", highlight=False
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:  # before the training loop, or a second signal: the last checkpoint (if any) stays
        last = out / "checkpoint_last.pt"
        hint = _resume_hint(dataset, out, device) if last.is_file() else "no checkpoint yet: nothing to resume"
        err_console.print(f"interrupted: {hint}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 validates and reports
        return
    best = (
        "no validation split" if result.best_metric is None else f"best student mean val Dice {result.best_metric:.4f}"
    )
    console.print(
        f"done: {result.steps} steps, {result.images_per_s:.1f} images/s, {best}; "
        f"checkpoints in {result.run_dir} (best: {result.best_checkpoint.name}, last: {result.last_checkpoint.name})"
    )


def _resume_hint(dataset: Path, out: Path, device: str) -> str:
    """The command that continues the run: the saved (resolved) config is the one ``--resume`` must be given."""
    import shlex

    args = ["confkd", "train", str(dataset), "--config", str(out / "config.yaml"), "--out", str(out), "--resume"]
    if device != "auto":
        args += ["--device", device]
    return "resume with  " + shlex.join(args)


def evaluate(
    pred_dir: Annotated[Path, typer.Argument(help="Folder of predictions (<case>_seg.<ext> or <case>.<ext>).")],
    label_dir: Annotated[Path, typer.Argument(help="Folder of ground-truth label maps (<case>.<ext>).")],
    dataset_json: Annotated[
        Path | None, typer.Option("--dataset-json", help="dataset.json whose labels name the classes.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write per_case.csv and summary.csv (default PRED_DIR).")
    ] = None,
) -> None:
    """Score predictions against labels: 3D Dice and HD95 (mm) per class, per case and summarised."""
    from confkd.evaluation import evaluate_folder

    out_dir = out or pred_dir
    try:
        result = evaluate_folder(pred_dir, label_dir, dataset_json=dataset_json, out_dir=out_dir)
    except ConfKDError as e:
        fail(str(e))
    dice, hd = result.summary["dice"], result.summary["hd95"]
    rows = []
    keys: list[int | str] = [*result.classes, "mean"]
    for key in keys:
        name = result.classes[key] if isinstance(key, int) else "mean"
        d, h = dice[key], hd[key]
        nan_note = f" ({h.n_nan} undefined)" if h.n_nan else ""
        rows.append([name, f"{d.mean:.4f} ± {d.std:.4f}", f"{h.mean:.2f} ± {h.std:.2f}{nan_note}", str(d.n)])
    show_table(["class", "Dice", "HD95 mm", "cases"], rows)
    for row in result.errors:
        err_console.print(f"[red]error:[/] {row.case}: {row.error}", highlight=False)
    if result.missing:
        more = len(result.missing) - 10
        shown = ", ".join(result.missing[:10]) + (f", ... ({more} more)" if more > 0 else "")
        err_console.print(f"[yellow]no prediction[/] for {len(result.missing)} labels: {shown}")
    console.print(f"per-case and summary CSV written to {out_dir}")
    if result.errors or result.missing:
        raise typer.Exit(EXIT_FAILED)
