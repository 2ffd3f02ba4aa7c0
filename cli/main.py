"""The ``confkd`` command line: thin commands, each over one library call.

Heavy modules (torch, nibabel, SimpleITK) are imported inside the commands so that ``confkd --help`` is instant.
Library errors (:class:`confkd.errors.ConfKDError`) become one red line and an exit code, never a traceback.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from confkd.cli import data_commands, demo_command, export_commands, report_commands, segment_commands, train_commands
from confkd.cli._common import console

app = typer.Typer(
    name="confkd",
    help="Medical image segmentation with mixed supervision (ConfKD): train, export, segment.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # never print patient paths or tensors in a traceback
    add_completion=False,
)
app.command()(demo_command.demo)
app.command()(data_commands.info)
app.command()(data_commands.phantoms)
app.command()(data_commands.manifest)
app.command("config")(data_commands.show_config)
app.command()(train_commands.train)
app.command()(train_commands.evaluate)
app.command()(segment_commands.segment)
app.command("merge-reports")(report_commands.merge_reports)
app.command()(export_commands.export)


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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
