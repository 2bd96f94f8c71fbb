"""Rendering for ``tandem ctl``: data on stdout, messages on stderr.

Formats: ``table`` (the essential columns), ``wide`` (every column), ``json`` and
``yaml`` (every field of every row, for machines: the table is only a view of them).
Colour follows rich: off when ``NO_COLOR`` is set (any value), when ``TERM=dumb`` or
when the stream is not a terminal. Off a terminal, tables are as wide as ``COLUMNS``
(default 200) so a pipe gets whole rows.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "wide", "json", "yaml")


def _console(file: Any) -> Console:
    tty = hasattr(file, "isatty") and file.isatty()
    width = None
    if not tty:
        try:
            width = int(os.environ.get("COLUMNS", "200"))
        except ValueError:
            width = 200
    return Console(file=file, no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False,
                   width=width, soft_wrap=False)


def out() -> Console:
    """The data console (stdout), made at each use: tests swap sys.stdout."""
    return _console(sys.stdout)


def err() -> Console:
    """The message console (stderr)."""
    return _console(sys.stderr)


def message(text: str, style: str = "") -> None:
    """A message for people, on stderr (never mixed with the data)."""
    err().print(text, style=style or None, markup=False)


def warn(text: str) -> None:
    message(f"warning: {text}", "yellow")


def error(text: str) -> None:
    message(f"error: {text}", "red")


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` of the row dict, ``header``, ``fmt`` for the cell,
    ``wide`` when shown only with ``-o wide``."""

    key: str
    header: str
    fmt: Callable[[Any], str] | None = None
    wide: bool = False
    justify: str = "left"

    def cell(self, row: dict) -> str:
        v = row.get(self.key)
        if self.fmt is not None:
            return self.fmt(v)
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.1f}"
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v) or "-"
        return str(v)


def table(rows: list[dict], columns: list[Column], wide: bool = False, title: str | None = None) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", show_edge=False, pad_edge=False,
              header_style="bold")
    shown = [c for c in columns if wide or not c.wide]
    for c in shown:
        t.add_column(c.header, justify=c.justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*(c.cell(r) for c in shown))
    return t


def dump(data: Any, fmt: str, compact: bool = False) -> str:
    """JSON (indented, or one line when ``compact``) or YAML text of plain data."""
    if fmt == "json":
        return json.dumps(data, indent=None if compact else 2, sort_keys=False, default=str)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def emit(data: Any, fmt: str, rows: list[dict] | None = None, columns: list[Column] | None = None,
         title: str | None = None, compact: bool = False, console: Console | None = None) -> None:
    """Write one rendering of ``data`` to stdout: a table of ``rows`` for table/wide,
    ``data`` itself for json/yaml."""
    if fmt in ("json", "yaml"):
        text = dump(data, fmt, compact)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return
    c = console or out()
    t = table(rows if rows is not None else list(data), columns or [], wide=fmt == "wide", title=title)
    need = c.measure(t, options=c.options.update_width(100_000)).maximum
    if need > c.width:  # whole rows rather than cut cells: a wide table wraps like kubectl's
        c = Console(file=c.file, no_color=c.no_color or None, highlight=False, width=need, soft_wrap=False,
                    force_terminal=c.is_terminal)
    c.print(t)


def pct(v: Any) -> str:
    """0.8123 -> "81.2%"; None or a negative value (no figure yet) -> "-"."""
    if v is None or (isinstance(v, (int, float)) and v < 0):
        return "-"
    return f"{100 * v:.1f}%"


#: a node announces this wait (or more) for a queue nobody staffs (router.policy.UNBOUNDED_WAIT_S)
UNBOUNDED_S = 1e9


def secs(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v >= UNBOUNDED_S:
        return "unstaffed"
    if v < 60:
        return f"{v:.1f}s"
    if v < 3600:
        return f"{int(v // 60)}m{int(v % 60):02d}s"
    return f"{int(v // 3600)}h{int(v % 3600 // 60):02d}m"


def yesno(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "no")


def joined(v: Iterable[Any] | None) -> str:
    return ",".join(str(x) for x in v or ()) or "-"
