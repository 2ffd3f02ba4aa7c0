"""Commands about data: ``info``, ``phantoms``, ``manifest``, ``config``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from confkd.cli._common import EXIT_FAILED, console, err_console, fail, resolve_config, show_table
from confkd.errors import ConfKDError


def info(
    paths: Annotated[list[Path], typer.Argument(help="Image files (NIfTI, NRRD, MHA/MHD) or DICOM series folders.")],
) -> None:
    """Show the shape, spacing, orientation and header codes of medical images."""
    from confkd.data.describe import describe_volume
    from confkd.data.volume import read_volume

    rows: list[list[str]] = []
    failed = 0
    for path in paths:
        try:
            volume = read_volume(path)
        except ConfKDError as e:
            err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            failed += 1
            continue
        d = describe_volume(volume)
        rows.append(
            [
                str(path),
                d["format"],
                "×".join(str(n) for n in d["shape"]),
                "×".join(f"{s:.3g}" for s in d["spacing"]),
                d["orientation"],
                f"{d['obliquity_deg']:.1f}",
                d["codes"],
                d["dtype"],
            ]
        )
    if rows:
        show_table(["file", "format", "shape", "spacing mm", "axes", "oblique°", "q/s code", "dtype"], rows)
    if failed:
        raise typer.Exit(EXIT_FAILED)


def manifest(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw dataset folder (dataset.json, imagesTr, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the manifest JSON.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (its data section).")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
) -> None:
    """Decide per case which supervision it gets (strong, weak or none) and save it as a manifest."""
    from confkd.data.dataset import NnUNetDataset
    from confkd.data.manifest import build_manifest_from_config

    cfg = resolve_config(config, overrides)
    try:
        ds = NnUNetDataset.open(dataset)
        result = build_manifest_from_config(ds, cfg.data)
        result.save(out)
    except ConfKDError as e:
        fail(str(e))
    show_table(
        ["supervision", "patients", "cases"],
        [[str(k), str(v["patients"]), str(v["cases"])] for k, v in result.summary().items()],
    )
    console.print(f"manifest written to {out}")


def phantoms(
    out: Annotated[Path, typer.Argument(help="Folder to create (an nnU-Net v2 raw dataset with scribblesTr/).")],
    n_train: Annotated[int, typer.Option(min=1, help="Training patients.")] = 12,
    n_val: Annotated[int, typer.Option(min=0, help="Validation patients.")] = 4,
    n_test: Annotated[int, typer.Option(min=0, help="Test patients (imagesTs, with labelsTs).")] = 4,
    frames: Annotated[int, typer.Option(min=1, help="Cases per patient (like ACDC's ED/ES frames).")] = 2,
    size: Annotated[int, typer.Option(min=32, help="In-plane matrix size.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed gives the same dataset).")] = 0,
) -> None:
    """Synthesise cardiac-like phantom scans with dense labels and scribbles (no patient data, no download)."""
    from confkd.data.phantoms import write_phantom_dataset

    if out.exists() and any(out.iterdir()):
        fail(f"{out}: folder exists and is not empty; choose a new folder")
    root = write_phantom_dataset(
        out, n_train=n_train, n_val=n_val, n_test=n_test, frames=frames, size=(size, size), seed=seed
    )
    n_cases = (n_train + n_val) * frames
    console.print(f"wrote {n_cases} training/validation cases and {n_test * frames} test cases to {root}")


def show_config(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
) -> None:
    """Validate a config (file and overrides) and print the resolved YAML."""
    import yaml

    cfg = resolve_config(config, overrides)
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", highlight=False, markup=False)
