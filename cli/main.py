"""The ``confkd`` command line: thin commands, each over one library call.

Heavy modules (torch, nibabel, SimpleITK) are imported inside the commands so that ``confkd --help`` is instant.
Library errors (:class:`confkd.errors.ConfKDError`) become one red line and an exit code, never a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from confkd.errors import ConfigError, ConfKDError

app = typer.Typer(
    name="confkd",
    help="Medical image segmentation with mixed supervision (ConfKD): train, export, segment.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # never print patient paths or tensors in a traceback
    add_completion=False,
)
# soft_wrap: never insert line breaks into long paths in messages
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but some input failed
EXIT_USAGE = 2  # bad arguments, config or dataset


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one error line (no traceback) and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def show_table(headers: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal; tab-separated lines (header first) when piped, so scripts can parse them."""
    if console.is_terminal:
        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        for line in [headers, *rows]:
            typer.echo("\t".join(line))


def _version_callback(value: bool) -> None:
    if value:
        from confkd import __version__

        console.print(f"confkd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug log lines.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
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


@app.command()
def manifest(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw dataset folder (dataset.json, imagesTr, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the manifest JSON.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (its data section).")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
) -> None:
    """Decide per case which supervision it gets (strong, weak or none) and save it as a manifest."""
    from confkd.config import Config, apply_overrides, load_config
    from confkd.data.dataset import NnUNetDataset
    from confkd.data.manifest import build_manifest_from_config

    try:
        cfg = load_config(config, overrides or []) if config else apply_overrides(Config(), overrides or [])
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


@app.command()
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


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
) -> None:
    """Validate a config (file and overrides) and print the resolved YAML."""
    import yaml

    from confkd.config import Config, apply_overrides, load_config

    try:
        cfg = load_config(config, overrides or []) if config else apply_overrides(Config(), overrides or [])
    except ConfigError as e:
        fail(str(e))
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", highlight=False, markup=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
