"""``confkd segment``: batch segmentation with confidence maps, QA reports and a summary.

Exit codes: 0 every case succeeded (or was already complete), 1 some case failed (the others completed),
2 usage errors (no input matched, a bad ``--shard``, no or unloadable model, unwritable OUT_DIR),
130 interrupted (SIGINT / SIGTERM; a re-run of the same command finishes the rest).
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from confkd.cli import _devices
from confkd.cli._common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, console, err_console, fail, show_table
from confkd.errors import ConfKDError

if TYPE_CHECKING:
    from confkd.inference.pipeline import BatchResult, CaseOutcome

DEFAULT_OUT = Path("confkd_out")
EXIT_INTERRUPTED = 130


class Backend(str, Enum):
    """Who runs the network (mirrors ``confkd.inference.model.Backend``, which imports torch)."""

    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    triton = "triton"


def bundled_model() -> Path | None:
    """The default model shipped with confkd (cine MRI, see confkd/models/*/MODEL_CARD.md), if installed."""
    from confkd.bundled import bundled_model_dir

    return bundled_model_dir()


def resolve_model_path(model: Path | None) -> Path:
    """``--model``, else the bundled default model; a usage error (exit 2) when there is neither."""
    path = model if model is not None else bundled_model()
    if path is None:
        fail("no --model given and this installation has no bundled default model: pass a checkpoint or model folder")
        raise typer.Exit(EXIT_USAGE)  # not reached (fail exits); for type checkers that cannot see it
    return path


class _Plain:
    """One line per finished case (failures on stderr); used when stdout is not a terminal."""

    def __init__(self) -> None:
        self.total = 0
        self.count = 0

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def on_start(self, total: int, skipped: int) -> None:
        self.total = total
        if skipped:
            console.print(f"skipping {skipped} complete case(s) (--overwrite redoes them)", highlight=False)
        console.print(f"segmenting {total} case(s)", highlight=False)

    def on_case(self, outcome: CaseOutcome) -> None:
        self.count += 1
        where = f"[{self.count}/{self.total}]"
        if outcome.status == "failed":
            err_console.print(f"{where} FAILED {outcome.case} ({outcome.stage}): {outcome.message}", highlight=False)
        else:
            flag = " FLAGGED" if outcome.flagged else ""
            console.print(f"{where} ok {outcome.case} {outcome.seconds:.2f} s{flag}", highlight=False)


class _Bar:
    """A rich progress bar (done, failed, skipped, scans/s, ETA); failures are printed above it."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]segment"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]}  [red]failed {task.fields[failed]}[/]  skipped {task.fields[skipped]}"),
            TextColumn("{task.fields[rate]} scans/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: Any = None
        self.start = time.perf_counter()
        self.ok = self.failed = 0

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_start(self, total: int, skipped: int) -> None:
        self.start = time.perf_counter()
        self.task = self.progress.add_task("segment", total=total, ok=0, failed=0, skipped=skipped, rate="-")

    def on_case(self, outcome: CaseOutcome) -> None:
        if outcome.status == "failed":
            self.failed += 1
            self.progress.console.print(
                f"[red]FAILED[/] {outcome.case} ({outcome.stage}): {outcome.message}", highlight=False
            )
        else:
            self.ok += 1
        rate = self.ok / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, advance=1, ok=self.ok, failed=self.failed, rate=f"{rate:.2f}")


def _show_summary(result: BatchResult) -> None:
    rows = [
        ["ok", str(len(result.ok))],
        ["failed", str(len(result.failed))],
        ["skipped (complete)", str(len(result.skipped))],
        ["flagged (whole folder)", str(result.flagged)],
        ["scans/s", f"{result.scans_per_s:.2f}"],
        ["seconds", f"{result.seconds:.1f}"],
        ["out", str(result.out_dir)],
    ]
    show_table(["segment", "value"], rows)
    if result.failed:
        err_console.print(f"failures are listed in {result.failures_path}", highlight=False)


def segment(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image files (NIfTI, NRRD, MHA), DICOM series folders, folders or glob patterns."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: ./confkd_out).", show_default=False)
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="A training checkpoint (.pt) or a `confkd export` model directory "
            "(default: the bundled cine-MRI model, ACDC-trained, research use only).",
        ),
    ] = None,
    backend: Annotated[Backend, typer.Option(help="Who runs the network.")] = Backend.auto,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    devices: Annotated[
        str | None, typer.Option(help="Several devices, one worker process each: 0,1 (GPUs), or cpu,cpu.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo cases whose outputs are complete.")] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Flip test-time augmentation.")] = False,
    shard: Annotated[
        str | None, typer.Option(help="Process shard I of N (I/N, 0 <= I < N): a stable split by case name.")
    ] = None,
    preview: Annotated[
        bool, typer.Option("--preview", help="Also write <case>_preview.png (slices, labels, confidence).")
    ] = False,
    low_confidence: Annotated[
        float, typer.Option(help="Voxels below this confidence count as low-confidence in the reports.")
    ] = 0.5,
    max_voxels: Annotated[
        int,
        typer.Option(
            min=0, help="Refuse a scan whose image or network grid has more voxels (before decoding it); 0: no limit."
        ),
    ] = 2**31,  # confkd.data.volume.DEFAULT_MAX_VOXELS, not imported here: --help stays instant
    precision: Annotated[str, typer.Option(help="TensorRT engine precision: fp32 or fp16.")] = "fp16",
    engine_dir: Annotated[
        Path | None, typer.Option(help="TensorRT engine cache (default: $CONFKD_ENGINE_DIR, else trt_engines/).")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="--backend triton: the Triton server's HTTP address, HOST:PORT.")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="--backend triton: the model's name on the server (default: export's).")
    ] = None,
) -> None:
    """Segment scans: label map, confidence map and QA report per case, plus summary.csv and failures.jsonl."""
    from confkd.inference.inputs import display_path, parse_shard, resolve_inputs

    if not 0.0 < low_confidence <= 1.0:
        fail(f"--low-confidence {low_confidence}: must be in (0, 1]")
    if backend is Backend.triton and url is None:
        fail("--backend triton needs --url HOST:PORT (the Triton server's HTTP port, 8000 by default)")
    if backend is not Backend.triton and (url is not None or model_name is not None):
        fail("--url and --model-name apply to --backend triton only")
    try:
        shard_spec = parse_shard(shard) if shard is not None else None
    except ConfKDError as e:
        fail(str(e))
    if out is None:
        out = DEFAULT_OUT
        console.print(f"no --out given: writing to ./{DEFAULT_OUT}/", highlight=False)
    model_path = resolve_model_path(model)
    device_list = _devices.device_list(devices, device, backend.value)

    resolved = resolve_inputs(inputs, exclude=out)
    for pattern in resolved.unmatched:
        err_console.print(f"[yellow]warning:[/] {display_path(pattern)} matched no file", highlight=False)
    if not resolved.cases and not resolved.problems:
        fail(f"no inputs matched: {' '.join(display_path(i) for i in inputs)} (no image files or DICOM series found)")
    if not resolved.cases and all(p.error_type == "InputError" for p in resolved.problems):
        fail("no inputs matched: " + "; ".join(p.message for p in resolved.problems))
    if shard_spec is not None:
        total = len(resolved)
        resolved = resolved.shard(*shard_spec)
        console.print(f"shard {shard_spec[0]}/{shard_spec[1]}: {len(resolved)} of {total} case(s)", highlight=False)

    from confkd.inference.model import load_model
    from confkd.inference.pipeline import BatchInterrupted, run_batch

    try:
        # --devices: one worker process per device loads the model (confkd.inference.multidevice)
        pool = _devices.start_pool(model_path, device_list, engine_dir, backend=backend.value, precision=precision)
        provider = None
        if backend in (Backend.auto, Backend.tensorrt) and model_path.is_dir():
            from confkd.export.engine_cache import engine_provider

            provider = engine_provider(engine_dir)
        loaded = pool or load_model(
            model_path,
            backend=backend.value,
            device=device,
            precision=precision,
            engine_provider=provider,
            url=url,
            triton_model=model_name,
        )
    except ConfKDError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err_console.print("interrupted while loading the model; nothing was written", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:  # a model file is untrusted input: any failure to load it is a usage error, not a crash
        fail(f"{display_path(model_path)}: cannot load the model ({type(e).__name__}: {e})")
    progress = _Bar() if console.is_terminal else _Plain()
    try:
        with progress:
            result = run_batch(
                resolved,
                out,
                loaded,
                overwrite=overwrite,
                tta=tta,
                preview=preview,
                low_confidence=low_confidence,
                max_voxels=max_voxels or None,
                progress=progress,
            )
    except BatchInterrupted as e:
        _show_summary(e.result)
        err_console.print(
            f"interrupted ({e.signal_name}): {len(e.result.ok)} case(s) written; run the same command again to "
            "finish the rest (complete cases are skipped)",
            highlight=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:  # before run_batch installed its handlers: nothing was written
        err_console.print("interrupted before the batch started; nothing was written", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ConfKDError as e:
        fail(str(e))
    _show_summary(result)
    raise typer.Exit(EXIT_FAILED if result.failed else EXIT_OK)
