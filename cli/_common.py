"""Shared pieces of the CLI: consoles, one-line failures, tables, config loading."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from confkd.errors import ConfigError

if TYPE_CHECKING:
    from confkd.config import Config

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


@contextlib.contextmanager
def quiet_info_logs(enabled: bool = True) -> Iterator[None]:
    """Keep INFO log lines off the terminal (a progress display shows them); files still get them."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)] if enabled else []
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)


def resolve_config(config: Path | None, overrides: list[str] | None) -> Config:
    """The config from an optional YAML file plus ``--set`` overrides; a ConfigError becomes a one-line failure."""
    from confkd.config import Config, apply_overrides, load_config

    try:
        return load_config(config, overrides or []) if config else apply_overrides(Config(), overrides or [])
    except ConfigError as e:
        fail(str(e))
