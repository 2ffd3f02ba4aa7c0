"""``confkd merge-reports``: one summary for the output folders of sharded ``confkd segment`` runs.

Exit codes: 0 merged, no failed case; 1 merged, some case failed; 2 the folders cannot be merged (not segment
outputs, a case in two folders, a shard missing, an unwritable ``--out``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from confkd.cli._common import EXIT_FAILED, EXIT_OK, fail, show_table
from confkd.errors import ConfKDError


def merge_reports(
    folders: Annotated[list[Path], typer.Argument(help="The --out folders of the segment shards.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged summary.csv and failures.jsonl.")],
    shards: Annotated[
        int | None,
        typer.Option(help="N of --shard I/N: check that every shard is there and no folder mixes shards.", min=1),
    ] = None,
    update_reports: Annotated[
        bool,
        typer.Option("--update-reports", help="Rewrite the shards' case reports whose flags differ from the batch's."),
    ] = False,
) -> None:
    """Merge sharded segment outputs: summary.csv (flags recomputed over the whole batch) and failures.jsonl."""
    from confkd.inference.inputs import display_path
    from confkd.inference.merge import merge_outputs

    try:
        result = merge_outputs(folders, out, shards=shards, update_reports=update_reports)
    except ConfKDError as e:
        fail(str(e))
    except OSError as e:  # --out, or a shard's report with --update-reports
        fail(f"{display_path(e.filename or out)}: cannot write ({e.strerror or e})")
    rows = [
        ["folders", str(len(result.sources))],
        ["ok", str(result.ok)],
        ["failed", str(result.failed)],
        ["flagged", str(result.flagged)],
        ["failure lines", str(result.failure_lines)],
    ]
    if update_reports:
        rows.append(["reports updated", str(result.updated)])
    rows.append(["out", display_path(result.out_dir)])
    show_table(["merge-reports", "value"], rows)
    raise typer.Exit(EXIT_FAILED if result.failed else EXIT_OK)
