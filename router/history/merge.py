"""Several embedded histories read as one (``tandem report … --data-dir DIR``).

Each node keeps its embedded (chdb) history in its own data dir (``<node dir>/history``),
and one process can open only one chdb path: the demo's nodes write
``DIR/cluster/nodes/<site>/history`` each. When ``DIR/history`` does not exist, the
report commands look for node histories under ``DIR`` and read
them merged (up to four levels down): a child process per history exports its tables (``FINAL``: one row per key)
in ClickHouse's Native format, and a temporary chdb store in this process loads them.
Keys are idempotent, so a row present in two histories (it cannot be, normally: each
node writes the calls that ended there) still counts once. The temporary store is
removed when it is closed.

A history whose node is still running cannot be opened (chdb holds its path): stop the
node (or the demo) first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from router.history.schema import TABLES
from router.history.store import ChdbStore, StoreError

MAX_DEPTH = 4


def node_histories(data_dir: str | Path) -> list[Path]:
    """Embedded histories under ``data_dir`` (directories named ``history`` holding a
    chdb ``metadata`` dir), at most four levels down, sorted."""
    root = Path(data_dir)
    found = []
    for depth in range(1, MAX_DEPTH + 1):
        pattern = "/".join(["*"] * (depth - 1) + ["history"])
        for p in root.glob(pattern):
            if p.is_dir() and (p / "metadata").is_dir():
                found.append(p)
    return sorted(set(found))


def export(src: Path, out_dir: Path) -> None:
    """(In a child process.) Write each table of the history at ``src`` to
    ``out_dir/<table>.native`` (nothing for an empty or missing table)."""
    store = ChdbStore(src)
    try:
        for table in TABLES:
            try:
                res = store._run(f"SELECT * FROM {store.database}.{table} FINAL", "Native")
            except StoreError as e:
                if e.code in (60, 81):  # no such table / database: nothing to export
                    continue
                raise
            data = res.bytes() if res is not None else b""
            if data:
                (out_dir / f"{table}.native").write_bytes(data)
    finally:
        store.close()


class MergedStore(ChdbStore):
    """A temporary chdb store holding the rows of several histories; removed on close."""

    def __init__(self, path: Path, sources: list[Path], tmp: Path) -> None:
        super().__init__(path)
        self.sources = sources
        self.url = " + ".join(str(s) for s in sources)
        self._tmp = tmp

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def merged_store(sources: list[Path], timeout: float = 300.0) -> MergedStore:
    """Export every history (child processes, in parallel) and load them into one
    temporary store. Raises StoreError when a history cannot be read."""
    tmp = Path(tempfile.mkdtemp(prefix="tandem-history-merge-"))
    try:
        dirs = []
        for i, _ in enumerate(sources):
            d = tmp / f"export-{i}"
            d.mkdir()
            dirs.append(d)

        def run(job: tuple[Path, Path]) -> subprocess.CompletedProcess:
            src, out = job
            return subprocess.run([sys.executable, "-m", "router.history.merge", str(src), str(out)],
                                  capture_output=True, text=True, timeout=timeout)

        with ThreadPoolExecutor(max_workers=min(4, len(sources))) as pool:
            results = list(pool.map(run, zip(sources, dirs)))
        for src, r in zip(sources, results):
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                hint = " (is its node still running?)" if "EmbeddedServer" in r.stderr else ""
                raise StoreError(f"cannot read the history at {src}{hint}: {last}")
        store = MergedStore(tmp / "merged", list(sources), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        store.migrate()
        for d in dirs:
            for table in TABLES:
                f = d / f"{table}.native"
                if f.exists():
                    cols = [r[0] for r in store.query("DESCRIBE file({f}, 'Native')", {"f": str(f)})]
                    names = ", ".join(cols)
                    store.query(f"INSERT INTO {{db}}.{table} ({names}) SELECT {names} FROM file({{f}}, 'Native')",
                                {"f": str(f)})
    except BaseException:
        store.close()
        raise
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return store


if __name__ == "__main__":  # python -m router.history.merge SRC OUT_DIR
    export(Path(sys.argv[1]), Path(sys.argv[2]))
