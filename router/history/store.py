"""History stores: one interface, two backends, the same SQL.

* :class:`ClickHouseServerStore` — a real server through clickhouse-driver (native
  protocol), URL ``clickhouse://[user[:password]@]host[:port][/database]``.
* :class:`ChdbStore` — ClickHouse in-process (chdb) with its files in a data directory;
  the embedded default (``make demo``). chdb is imported only when such a store opens
  (it costs ~0.5 GB and a second), and one process can hold one chdb path at a time.

:func:`open_store` takes either form: a ``clickhouse://`` URL or a directory.

Contract of every store (thread-safe: calls are serialised by a lock):

* ``query(sql, params)`` runs one statement and returns its rows as tuples. ``{db}`` in
  the SQL is the store's database; ``{name}`` is ``params[name]`` rendered as a SQL
  literal (:func:`literal`). No other braces may appear in the SQL.
* ``insert(table, columns, data)`` inserts rows given *column-wise* (one list per column,
  values already of the column's Python type: str, int, float, list).
* Failures raise :class:`StoreUnavailable` (the server cannot be reached or is
  overloaded: try again later) or :class:`StoreError` (the statement or data was refused:
  trying again will not help).
* ``migrate()`` brings the schema to :func:`router.history.schema.latest_version`.
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from router.history import schema


class StoreError(Exception):
    """The store refused a statement or its data; repeating it will not help."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError):
    """The store cannot take the request now (down, unreachable, overloaded); retry later."""


# Server error codes that mean "not now" rather than "never" (ClickHouse ErrorCodes).
_TRANSIENT_CODES = frozenset({
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    243,  # NOT_ENOUGH_SPACE
    252,  # TOO_MANY_PARTS
    319,  # UNKNOWN_STATUS_OF_INSERT
    394,  # QUERY_WAS_CANCELLED
    425,  # SYSTEM_ERROR
})

# Client-side failures to serialise a value (wrong Python type for the column).
_ENCODING_ERRORS = (TypeError, ValueError, AttributeError, OverflowError, struct.error)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def literal(value: Any) -> str:
    """A Python value as a ClickHouse SQL literal (str, int, float, bool, list/tuple)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot render {value!r} as SQL")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as SQL")


def render(sql: str, database: str, params: Mapping[str, Any] | None = None) -> str:
    """Substitute ``{db}`` and ``{name}`` placeholders (see the module docstring)."""
    params = params or {}

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "db":
            return database
        if name not in params:
            raise KeyError(f"SQL placeholder {{{name}}} has no parameter")
        return literal(params[name])

    return _PLACEHOLDER.sub(sub, sql)


class HistoryStore(ABC):
    """See the module docstring for the contract."""

    url: str
    database: str

    def __init__(self, database: str) -> None:
        if not _IDENT.match(database):
            raise ValueError(f"bad database name {database!r}")
        self.database = database
        self._lock = threading.Lock()

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        text = render(sql, self.database, params)
        with self._lock:
            return self._query(text)

    def insert(self, table: str, columns: Sequence[str], data: Sequence[Sequence[Any]]) -> None:
        if not data or not len(data[0]):
            return
        if not _IDENT.match(table) or not all(_IDENT.match(c) for c in columns):
            raise StoreError(f"bad table or column name in {table}({', '.join(columns)})")
        with self._lock:
            self._insert(table, list(columns), data)

    def ping(self) -> bool:
        try:
            return self.query("SELECT 1") == [(1,)]
        except StoreError:
            return False

    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied, in order; return their versions."""
        self.query(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        self.query(schema.MIGRATIONS_TABLE_SQL)
        done = set(self.applied_versions())
        applied = []
        for m in schema.MIGRATIONS:
            if m.version in done:
                continue
            for stmt in m.statements:
                self.query(stmt)
            self.query(
                "INSERT INTO {db}.schema_migrations (version, name, applied_at) "
                "SELECT {v}, {n}, now()",
                {"v": m.version, "n": m.name},
            )
            applied.append(m.version)
        return applied

    def applied_versions(self) -> list[int]:
        try:
            rows = self.query("SELECT DISTINCT version FROM {db}.schema_migrations ORDER BY version")
        except StoreError as e:
            if e.code in (60, 81):  # UNKNOWN_TABLE, UNKNOWN_DATABASE: nothing applied yet
                return []
            raise
        return [int(r[0]) for r in rows]

    def close(self) -> None:
        pass

    def __enter__(self) -> "HistoryStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _query(self, sql: str) -> list[tuple]: ...

    @abstractmethod
    def _insert(self, table: str, columns: list[str], data: Sequence[Sequence[Any]]) -> None: ...


# --- the real server --------------------------------------------------------------------


class ClickHouseServerStore(HistoryStore):
    """clickhouse-driver over the native protocol. One connection, reconnected on demand
    by the driver; short timeouts so a dead server is noticed within seconds."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 2.0,
        send_receive_timeout: float = 30.0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise ValueError(f"not a clickhouse:// URL: {url!r}")
        database = parts.path.strip("/") or schema.DEFAULT_DATABASE
        super().__init__(database)
        from clickhouse_driver import Client

        self.url = url
        self._spec = {"connect_timeout": connect_timeout, "send_receive_timeout": send_receive_timeout,
                      "settings": dict(settings or {})}
        self.send_receive_timeout = send_receive_timeout
        # Connect to "default": our database may not exist before migrate().
        self._client = Client(
            parts.hostname or "127.0.0.1",
            port=parts.port or 9000,
            database="default",
            user=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            secure=parts.scheme == "clickhouses",
            connect_timeout=connect_timeout,
            send_receive_timeout=send_receive_timeout,
            sync_request_timeout=min(5.0, send_receive_timeout),
            settings=dict(settings or {}),
        )

    def _call(self, fn, *args, **kwargs):
        from clickhouse_driver import errors

        try:
            return fn(*args, **kwargs)
        except (errors.NetworkError, errors.SocketTimeoutError, EOFError, OSError) as e:
            self._client.disconnect()
            raise StoreUnavailable(f"{self.url}: {e}", getattr(e, "code", None)) from None
        except errors.ServerException as e:
            exc = StoreUnavailable if e.code in _TRANSIENT_CODES else StoreError
            message = e.message.split("Stack trace:")[0].strip()  # 18.16 appends one
            raise exc(f"{self.url}: {message}", e.code) from None
        except errors.Error as e:
            # Protocol-level trouble (unexpected packet, partial read): reconnect and retry.
            self._client.disconnect()
            raise StoreUnavailable(f"{self.url}: {e}", getattr(e, "code", None)) from None

    def _query(self, sql: str) -> list[tuple]:
        return [tuple(r) for r in self._call(self._client.execute, sql)]

    def _insert(self, table: str, columns: list[str], data: Sequence[Sequence[Any]]) -> None:
        sql = f"INSERT INTO {self.database}.{table} ({', '.join(columns)}) VALUES"
        try:
            self._call(self._client.execute, sql, data, columnar=True, types_check=False)
        except _ENCODING_ERRORS as e:
            self._client.disconnect()  # a half-sent block leaves the connection unusable
            raise StoreError(f"{table}: rows cannot be encoded: {e}") from None

    def spec(self) -> tuple[str, dict[str, Any]]:
        """What another process needs to open the same store: ``open_store(url, **kw)``."""
        return self.url, dict(self._spec)

    def close(self) -> None:
        with self._lock:
            self._client.disconnect()


# --- chdb (embedded) ----------------------------------------------------------------------

_chdb_lock = threading.Lock()
_chdb_sessions: dict[str, list] = {}  # path -> [session, refcount]
_CODE = re.compile(r"Code:\s*(\d+)")


class ChdbStore(HistoryStore):
    """ClickHouse in-process. ``path`` is its own directory (e.g. ``<data dir>/history``).
    Stores on the same path share one chdb session; chdb allows one path per process."""

    def __init__(self, path: str | Path, database: str = schema.DEFAULT_DATABASE) -> None:
        super().__init__(database)
        self.path = str(Path(path).resolve())
        self.url = self.path
        Path(self.path).mkdir(parents=True, exist_ok=True)
        with _chdb_lock:
            entry = _chdb_sessions.get(self.path)
            if entry is None:
                if _chdb_sessions:
                    other = next(iter(_chdb_sessions))
                    raise StoreError(
                        f"chdb is already open on {other} in this process; "
                        f"close that store before opening {self.path}"
                    )
                from chdb import session as chdb_session

                try:
                    entry = [chdb_session.Session(self.path), 0]
                except Exception as e:  # chdb raises plain RuntimeError/Exception
                    raise StoreError(f"chdb at {self.path}: {e}") from None
                _chdb_sessions[self.path] = entry
            entry[1] += 1
        self._session = entry[0]
        self._closed = False

    def _run(self, sql: str, fmt: str = "CSV"):
        if self._closed:
            raise StoreError(f"chdb store at {self.path} is closed")
        try:
            return self._session.query(sql, fmt)
        except Exception as e:
            text = str(e)
            m = _CODE.search(text)
            code = int(m.group(1)) if m else None
            exc = StoreUnavailable if code in _TRANSIENT_CODES else StoreError
            raise exc(f"chdb: {text.strip()}", code) from None

    def _query(self, sql: str) -> list[tuple]:
        res = self._run(sql, "ArrowTable")
        if res is None or not hasattr(res, "columns"):
            return []
        cols = [c.to_pylist() for c in res.columns]
        return list(zip(*cols)) if cols else []

    def _insert(self, table: str, columns: list[str], data: Sequence[Sequence[Any]]) -> None:
        try:
            body = "\n".join(map(json.dumps, map(list, zip(*data))))
        except (TypeError, ValueError) as e:
            raise StoreError(f"{table}: rows cannot be encoded: {e}") from None
        self._run(
            f"INSERT INTO {self.database}.{table} ({', '.join(columns)}) "
            f"FORMAT JSONCompactEachRow\n{body}"
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _chdb_lock:
            entry = _chdb_sessions.get(self.path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _chdb_sessions[self.path]
                try:
                    entry[0].close()
                except Exception:
                    pass


def open_store(target: str | Path, **kwargs: Any) -> HistoryStore:
    """A ``clickhouse://`` URL gives a server store; anything else is a directory for chdb
    (a node passes ``<its data dir>/history``)."""
    s = str(target)
    if s.startswith(("clickhouse://", "clickhouses://")):
        return ClickHouseServerStore(s, **kwargs)
    return ChdbStore(s, **kwargs)
