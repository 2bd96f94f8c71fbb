"""Rows (dicts) -> column-wise data typed for a table, checked before they reach a store;
and that column-wise data -> ClickHouse's Native column encoding without a per-row
Python step (:class:`ColumnarBatch`).

A bad value (wrong type, out of range) would make the store refuse a whole batch; here it
costs only its own row, which is set aside with the reason. The common case — every row
complete and well typed — runs at C speed (one ``map(itemgetter)`` per column, ``join``,
``min``/``max``), never a Python loop over the rows.

:class:`ColumnarBatch` is what a server store's insert process is handed instead of the
column lists (see :mod:`router.history.inserter`): numeric and time columns as numpy
arrays, string columns as one UTF-8 buffer plus the byte length of each value, arrays as
offsets plus their flattened elements. It pickles as a few buffers (no per-value work
in either process) and turns into the bytes of a Native block with numpy
(:meth:`ColumnarBatch.native`) — what clickhouse-driver would otherwise produce value by
value in Python. It covers the types the schema uses (String, UInt8..UInt64,
DateTime('UTC'), Float64, Array of those); :func:`columnar` returns None for anything
else, and the caller then inserts the lists as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from router.history.schema import TABLES, Column

if TYPE_CHECKING:
    import numpy as np

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
        # str.join takes str (and its subclasses) only, like isinstance, and raises
        # TypeError on anything else: the same check at a third of the cost.
        "".join(col)
        return True
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
        # One getter per column: a column is one C-level map over the rows, without the
        # row tuples and the zip(*) transposition (together 2-3x the cost).
        self._getters = [itemgetter(n) for n in self.names]
        self._conv = [converter(c.type) for c in self.columns]

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[list], list[tuple[Any, str]]]:
        """(data, rejected): ``data`` holds one list per column of :attr:`names` (empty
        when no row survived), values of the column's Python type; ``rejected`` the rows
        set aside with their reasons. A row missing a column gets its default; keys
        that are not columns are ignored on the fast path (every row complete and well
        typed) and make the row rejected otherwise."""
        if not isinstance(rows, (list, tuple)):
            rows = list(rows)  # one pass per column: an iterator would be spent by the first
        if not rows:
            return [], []
        try:
            data: list[list] | None = [list(map(g, rows)) for g in self._getters]
        except (KeyError, TypeError):
            data = None
        if data is not None:
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


# --- columnar: column lists -> Native column bytes, vectorised ------------------------------

# numpy is imported by the columnar functions only: the insert process starts (and the
# writer's first batch waits) without it when columnar inserts are off.
_UINT_DTYPE = {"UInt8": "<u1", "UInt16": "<u2", "UInt32": "<u4", "UInt64": "<u8"}
_DATETIME_DTYPE = "<u4"  # DateTime is UInt32 seconds on the wire, whatever its zone


def columnar_type(type_: str) -> bool:
    """True for a column type :func:`columnar` can encode."""
    if type_.startswith("Array(") and type_.endswith(")"):
        return columnar_type(type_[6:-1])
    return (type_ == "String" or type_ in _UINT_DTYPE or type_ == "Float64"
            or (type_.startswith("DateTime") and not type_.startswith("DateTime64")))


@dataclass
class StringPart:
    """A String column: every value's UTF-8 bytes back to back, and each one's length."""

    data: bytes
    lengths: np.ndarray  # uint64, one per value


@dataclass
class ArrayPart:
    """An Array(T) column: Native's cumulative end offsets, and the flattened elements."""

    offsets: np.ndarray  # uint64, one per value: the end of its elements in ``elements``
    elements: Any  # the part of the element type (StringPart, ndarray or ArrayPart)


def _part(type_: str, col: Sequence[Any]) -> Any | None:
    """The columnar part of one column of checked values, or None when a value does not
    fit the type exactly (the caller then keeps the lists: same result, old path)."""
    import numpy as np

    if type_ == "String":
        try:
            joined = "".join(col)
        except TypeError:
            return None
        if joined.isascii():  # the common case: byte lengths are the str lengths
            lengths = np.fromiter(map(len, col), np.uint64, len(col))
            return StringPart(joined.encode("ascii"), lengths)
        try:
            encoded = list(map(str.encode, col))  # UTF-8, strict: as the driver encodes
        except UnicodeEncodeError:
            return None  # e.g. a lone surrogate: let the driver report it as it did
        return StringPart(b"".join(encoded), np.fromiter(map(len, encoded), np.uint64, len(encoded)))
    if type_.startswith("Array(") and type_.endswith(")"):
        if not all(map(list.__instancecheck__, col)):
            return None
        lengths = np.fromiter(map(len, col), np.uint64, len(col))
        elements = _part(type_[6:-1], list(chain.from_iterable(col)))
        if elements is None:
            return None
        return ArrayPart(np.cumsum(lengths, dtype=np.uint64), elements)
    # Numbers: infer the dtype first (np.array with a dtype would parse "12" or truncate
    # 1.5 silently), then range-check and cast in C.
    try:
        arr = np.array(col)
    except (ValueError, TypeError, OverflowError):
        return None
    if type_ == "Float64":
        if arr.dtype.kind not in "biuf" or (arr.size and not np.isfinite(arr).all()):
            return None
        return arr.astype("<f8")
    name = _DATETIME_DTYPE if type_.startswith("DateTime") else _UINT_DTYPE.get(type_)
    if name is None:
        return None
    dt = np.dtype(name)
    if arr.dtype.kind not in "biu":
        # Ints above 2^63 among smaller ones infer as float64 (lossy) or object: build
        # the UInt64 array from the ints themselves (numpy refuses negatives, too big).
        if name != "<u8" or not all(map(int.__instancecheck__, col)):
            return None
        try:
            return np.array(col, dtype=dt)
        except (OverflowError, ValueError, TypeError):
            return None
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dt).max):
        return None
    return arr.astype(dt)


def _varint_string(part: StringPart) -> bytes:
    """Native String column: for each value, its length as a LEB128 varint, then its bytes."""
    import numpy as np

    lengths = part.lengths
    n = len(lengths)
    if n == 0:
        return b""
    # Bytes of each varint: 1 below 2^7, 2 below 2^14, ...
    nvar = np.ones(n, np.uint64)
    for k in range(1, 10):
        more = lengths >= (np.uint64(1) << np.uint64(7 * k))
        if not more.any():
            break
        nvar += more
    record = nvar + lengths
    starts = np.cumsum(record) - record
    out = np.empty(int(record.sum()), np.uint8)
    is_data = np.ones(len(out), bool)
    for k in range(int(nvar.max())):
        sel = nvar > k
        pos = starts[sel] + np.uint64(k)
        byte = (lengths[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        byte |= np.where(nvar[sel] > k + 1, np.uint64(0x80), np.uint64(0))
        out[pos] = byte
        is_data[pos] = False
    # The data bytes fill the remaining positions in order: exactly ``part.data``.
    out[is_data] = np.frombuffer(part.data, np.uint8)
    return out.tobytes()


def _native(part: Any) -> bytes:
    if isinstance(part, StringPart):
        return _varint_string(part)
    if isinstance(part, ArrayPart):
        return part.offsets.astype("<u8").tobytes() + _native(part.elements)
    return part.tobytes()  # already the little-endian dtype of its column


def _to_list(type_: str, part: Any) -> list:
    import numpy as np

    if isinstance(part, StringPart):
        ends = np.cumsum(part.lengths).tolist()
        starts = [0] + ends[:-1]
        return [part.data[a:b].decode("utf-8") for a, b in zip(starts, ends)]
    if isinstance(part, ArrayPart):
        flat = _to_list(type_[6:-1], part.elements)
        ends = part.offsets.tolist()
        return [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]
    return part.tolist()


@dataclass
class ColumnarBatch:
    """Checked column-wise rows of one table, ready for the Native protocol.

    ``columns`` / ``types`` are the schema's; ``parts[i]`` encodes column i (see the
    module docstring). Made by :func:`columnar` in the writer's process; pickled to the
    insert process; :meth:`native` gives each column's Native bytes there.
    """

    table: str
    columns: list[str]
    types: list[str]
    rows: int
    parts: list[Any]

    def native(self) -> list[bytes]:
        """Each column's data as a Native block carries it (no state prefix: none of
        these types has one on the wire)."""
        return [_native(p) for p in self.parts]

    def to_lists(self) -> list[list]:
        """The column lists this batch was made from, as the store keeps them (an int
        in a Float64 column comes back as the float it is stored as), for a store that
        takes lists or the driver's own encoding."""
        return [_to_list(t, p) for t, p in zip(self.types, self.parts)]


def columnar(table: str, columns: Sequence[str], data: Sequence[Sequence[Any]]) -> ColumnarBatch | None:
    """``data`` (one list per column, as :meth:`TableEncoder.encode` or the spool give
    it) as a :class:`ColumnarBatch`; None when the table, a column or a value is outside
    what the columnar encoding covers — the caller then inserts the lists as they are,
    so a value the store would refuse is still refused by the store, as before."""
    schema_cols = {c.name: c.type for c in TABLES.get(table, ())}
    if not data or len(data) != len(columns) or any(c not in schema_cols for c in columns):
        return None
    types = [schema_cols[c] for c in columns]
    if not all(map(columnar_type, types)):
        return None
    rows = len(data[0])
    if any(len(col) != rows for col in data):
        return None
    parts = []
    for t, col in zip(types, data):
        p = _part(t, col)
        if p is None:
            return None
        parts.append(p)
    return ColumnarBatch(table, list(columns), types, rows, parts)
