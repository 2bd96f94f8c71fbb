"""Rows (dicts) -> column-wise data typed for a table, checked before they reach a store.

A bad value (wrong type, out of range) would make the store refuse a whole batch; here it
costs only its own row, which is set aside with the reason. The common case — every row
complete and well typed — runs at C speed (``itemgetter``, ``zip``, ``map``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

from router.history.schema import TABLES, Column

_UINT_MAX = {"UInt8": 2**8 - 1, "UInt16": 2**16 - 1, "UInt32": 2**32 - 1, "UInt64": 2**64 - 1}
_DATETIME_MAX = 2**32 - 1


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise TypeError(f"expected str, got {type(v).__name__}")


def _uint(limit: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{v} is not a whole number")
            v = int(v)
        elif not isinstance(v, int):  # bool is an int: True -> 1
            raise TypeError(f"expected an integer, got {type(v).__name__}")
        v = int(v)
        if not 0 <= v <= limit:
            raise ValueError(f"{v} out of range 0..{limit}")
        return v

    return conv


def _datetime(v: Any) -> int:
    """Unix seconds (int or float, floored) or an aware/naive-UTC datetime; 0 = never."""
    if isinstance(v, datetime):
        v = v.timestamp()
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} is not a time")
        v = math.floor(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected Unix seconds, got {type(v).__name__}")
    if not 0 <= v <= _DATETIME_MAX:
        raise ValueError(f"time {v} out of range")
    return v


def _float(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        f = float(v)
        if math.isfinite(f):
            return f
        raise ValueError(f"{v} is not finite")
    raise TypeError(f"expected a number, got {type(v).__name__}")


def _array(elem: Callable[[Any], Any]) -> Callable[[Any], list]:
    def conv(v: Any) -> list:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"expected a list, got {type(v).__name__}")
        return [elem(x) for x in v]

    return conv


def converter(type_: str) -> Callable[[Any], Any]:
    if type_ == "String":
        return _to_str
    if type_ in _UINT_MAX:
        return _uint(_UINT_MAX[type_])
    if type_.startswith("DateTime"):
        return _datetime
    if type_ == "Float64":
        return _float
    if type_.startswith("Array(") and type_.endswith(")"):
        return _array(converter(type_[6:-1]))
    raise ValueError(f"no converter for {type_}")


def _fast_ok(type_: str, col: list) -> bool:
    """True when the column needs no conversion; C-speed checks only (a TypeError from
    min/max or isfinite on a wrong type means "convert")."""
    if type_ == "String":
        return all(map(str.__instancecheck__, col))
    if type_ in _UINT_MAX or type_.startswith("DateTime"):
        if not all(map(int.__instancecheck__, col)):
            return False
        hi = _DATETIME_MAX if type_.startswith("DateTime") else _UINT_MAX[type_]
        return not col or (min(col) >= 0 and max(col) <= hi)
    if type_ == "Float64":
        # ints (and bools) are fine for a Float64 column; str/None raise TypeError.
        return all(map(math.isfinite, col))
    return False


class TableEncoder:
    """Encodes rows of one table. ``encode`` returns (data, rejected) where data is
    column-wise and rejected lists (row, reason) of the rows that were set aside."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.columns: tuple[Column, ...] = TABLES[table]
        self.names = [c.name for c in self.columns]
        self._get = itemgetter(*self.names)
        self._conv = [converter(c.type) for c in self.columns]

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[list], list[tuple[Any, str]]]:
        try:
            tuples = list(map(self._get, rows))
        except (KeyError, TypeError):
            tuples = None
        if tuples is not None:
            data = [list(col) for col in zip(*tuples)]
            try:
                for i, c in enumerate(self.columns):
                    try:
                        ok = _fast_ok(c.type, data[i])
                    except TypeError:
                        ok = False
                    if not ok:
                        data[i] = list(map(self._conv[i], data[i]))
                return data, []
            except (TypeError, ValueError, OverflowError):
                pass  # some row is bad: find it the slow way
        return self._slow(rows)

    def _slow(self, rows: Sequence[Any]) -> tuple[list[list], list[tuple[Any, str]]]:
        data: list[list] = [[] for _ in self.columns]
        rejected: list[tuple[Any, str]] = []
        for row in rows:
            if not isinstance(row, Mapping):
                rejected.append((row, f"a row must be a mapping, got {type(row).__name__}"))
                continue
            unknown = set(row) - set(self.names)
            if unknown:
                rejected.append((row, f"unknown column(s) {sorted(unknown)} for {self.table}"))
                continue
            out = []
            try:
                for c, conv in zip(self.columns, self._conv):
                    out.append(conv(row.get(c.name, c.default)))
            except (TypeError, ValueError, OverflowError) as e:
                rejected.append((row, f"{self.table}.{c.name}: {e}"))
                continue
            for i, v in enumerate(out):
                data[i].append(v)
        return data, rejected
