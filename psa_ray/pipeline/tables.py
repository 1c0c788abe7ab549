"""Tables of a run's figures (IoU, label statistics) as plain text (printed, report/index.md)
and as HTML (report/index.html), from one form: a header and rows of cells."""
from __future__ import annotations

import html

Table = tuple[list[str], list[list[str]]]  # header, rows of cells (first column: names)


def text_table(table: Table) -> str:
    """Aligned text: the first column left-aligned, the others right-aligned."""
    header, rows = table
    widths = [max(len(cells[i]) for cells in [header, *rows]) + 2 for i in range(len(header))]
    lines = [[f"{c:<{widths[0]}}" if i == 0 else f"{c:>{widths[i]}}" for i, c in enumerate(cells)]
             for cells in [header, *rows]]
    return "\n".join("".join(line).rstrip() for line in lines)


def html_table(table: Table) -> str:
    """An HTML <table> (header row, then one row per entry; numbers right-aligned by CSS)."""
    header, rows = table
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
