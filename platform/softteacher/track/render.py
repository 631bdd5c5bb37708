"""A table of text cells as aligned plain text (terminals) or GitHub Markdown (READMEs and
MLflow's artifact view): the one renderer of every table the platform prints."""

from __future__ import annotations

from collections.abc import Sequence


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [_aligned(header, widths), _aligned(["-" * w for w in widths], widths)]
    lines += [_aligned(row, widths) for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
