"""History stores: one interface, two backends, the same SQL.

* :class:`ClickHouseServerStore` — a real server through clickhouse-driver (native
  protocol), URL ``clickhouse://[user[:password]@]host[:port][/database]``, or over TLS
  ``clickhouses://…[?ca=PATH&cert=PATH&key=PATH]`` (see :func:`tls_params`). A store's
  ``url`` is the URL without its password and query: it is what messages and logs show.
* :class:`ChdbStore` — ClickHouse in-process (chdb) with its files in a data directory;
  the embedded default (``make demo``). chdb is imported only when such a store opens
  (it costs ~0.5 GB and a second), and one process can hold one chdb path at a time.

:func:`open_store` takes either form: a ``clickhouse[s]://`` URL or a directory.

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
import os
import re
import ssl
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

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

#: The query parameters of a ``clickhouses://`` URL: the files of its TLS.
TLS_PARAMS = ("ca", "cert", "key")


def shown_url(url: str) -> str:
    """``url`` as messages and logs may show it: no password, no query (``?ca=…&key=…``)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit((parts.scheme, f"{user}@{netloc[2]}" if user else netloc[2], parts.path, "", ""))


def tls_params(url: str) -> dict[str, str]:
    """The TLS files a ``clickhouses://`` URL names in its query: ``ca`` (the CA bundle
    the server's certificate must chain to; absent: the system's CAs), ``cert`` and
    ``key`` (this client's certificate and key; ``cert`` alone: a PEM holding both).
    ValueError for another parameter, a repeated one, or any on ``clickhouse://``."""
    parts = urlsplit(url)
    found: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in TLS_PARAMS:
            raise ValueError(f"{shown_url(url)}: unknown parameter {name!r} (only {', '.join(TLS_PARAMS)})")
        if name in found or not value:
            raise ValueError(f"{shown_url(url)}: parameter {name!r} given twice or empty")
        found[name] = value
    if found and parts.scheme != "clickhouses":
        raise ValueError(f"{shown_url(url)}: {'=, '.join(found)}= are for clickhouses:// (TLS) only")
    return found


def _tls_options(url: str, ca: str | None, cert: str | None, key: str | None) -> dict[str, Any]:
    """clickhouse-driver's TLS keywords: the server's certificate is always verified
    (against ``ca``, else the system's CAs) and its name checked; a client certificate
    when ``cert`` is given. The files are loaded once here, so a bad one is a clear
    ValueError now (naming the parameter and the path, never the contents), not an
    endless "unavailable" later."""
    if key and not cert:
        raise ValueError(f"{url}: key= without cert=")
    for name, path in (("ca", ca), ("cert", cert), ("key", key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{url}: {name}= file is not readable: {path}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        # The system's bundle (clickhouse-driver would take certifi's where installed).
        system = ssl.get_default_verify_paths().cafile
        ca = system if system and os.path.isfile(system) else None
    try:
        if ca is not None:
            ctx.load_verify_locations(ca)
    except (ssl.SSLError, ValueError) as e:
        raise ValueError(f"{url}: ca= {ca} holds no usable CA certificate: {e}") from None
    try:
        if cert is not None:
            # An encrypted key is refused here rather than prompted for on a terminal.
            ctx.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        raise ValueError(f"{url}: cert= {cert} and its key cannot be used: {e}") from None
    opts: dict[str, Any] = {"secure": True, "verify": True}
    if ca is not None:
        opts["ca_certs"] = ca
    if cert is not None:
        opts["certfile"] = cert
        if key is not None:
            opts["keyfile"] = key
    return opts


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
        password: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        """``password``, ``ca``, ``cert``, ``key``: as in the URL (these win over it)."""
        parts = urlsplit(url)
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise ValueError(f"not a clickhouse:// URL: {shown_url(url)!r}")
        database = parts.path.strip("/") or schema.DEFAULT_DATABASE
        super().__init__(database)
        from clickhouse_driver import Client

        params = tls_params(url)
        ca, cert, key = (ca or params.get("ca"), cert or params.get("cert"), key or params.get("key"))
        if parts.scheme != "clickhouses" and (ca or cert or key):
            raise ValueError(f"{shown_url(url)}: ca, cert and key are for clickhouses:// (TLS) only")
        if password is None:
            password = unquote(parts.password or "")
        self.url = shown_url(url)
        secure = {}
        if parts.scheme == "clickhouses":
            secure = _tls_options(self.url, *(os.path.abspath(f) if f else None for f in (ca, cert, key)))
        # What another process needs (spec()): the secrets travel as keywords, not in a URL.
        self._spec = {"connect_timeout": connect_timeout, "send_receive_timeout": send_receive_timeout,
                      "settings": dict(settings or {})}
        if password:
            self._spec["password"] = password
        for name, opt in (("ca", "ca_certs"), ("cert", "certfile"), ("key", "keyfile")):
            if opt in secure:
                self._spec[name] = secure[opt]
        self.send_receive_timeout = send_receive_timeout
        # Connect to "default": our database may not exist before migrate().
        self._client = Client(
            parts.hostname or "127.0.0.1",
            port=parts.port or (9440 if secure else 9000),
            database="default",
            user=unquote(parts.username or "default"),
            password=password,
            connect_timeout=connect_timeout,
            send_receive_timeout=send_receive_timeout,
            sync_request_timeout=min(5.0, send_receive_timeout),
            settings=dict(settings or {}),
            **secure,
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
        self._insert_with(table, lambda client: client.execute(sql, data, columnar=True, types_check=False))

    def _insert_with(self, table: str, send: Callable[[Any], Any]) -> None:
        try:
            self._call(send, self._client)
        except _ENCODING_ERRORS as e:
            self._client.disconnect()  # a half-sent block leaves the connection unusable
            raise StoreError(f"{table}: rows cannot be encoded: {e}") from None

    def insert_on_connection(self, table: str, send: Callable[[Any], Any]) -> None:
        """Run ``send(client)`` — clickhouse-driver's ``Client`` of this store — to insert
        into ``table`` by speaking the native protocol directly
        (:func:`router.history.inserter.insert_columnar`), under the store's lock and with
        its error mapping: StoreUnavailable (retry later) or StoreError (the rows or the
        statement are bad; a half-sent block drops the connection)."""
        with self._lock:
            self._insert_with(table, send)

    def spec(self) -> tuple[str, dict[str, Any]]:
        """What another process needs to open the same store: ``open_store(url, **kw)``
        (``url`` is the shown one; the password and the TLS files are in ``kw``)."""
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
                try:
                    from chdb import session as chdb_session
                except ImportError:
                    raise StoreError("the embedded history needs chdb: pip install 'tandem-router[embedded]' "
                                     "(or give a clickhouse:// history)") from None

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
    """A ``clickhouse://`` or ``clickhouses://`` URL gives a server store; anything else is
    a directory for chdb (a node passes ``<its data dir>/history``)."""
    s = str(target)
    if s.startswith(("clickhouse://", "clickhouses://")):
        return ClickHouseServerStore(s, **kwargs)
    return ChdbStore(s, **kwargs)
