"""A local clickhouse-server of our own: for tests, benchmarks and trying things out.

:class:`ClickHouseServer` writes a minimal config.xml/users.xml into a directory, starts
the server on free loopback ports (tcp, http, interserver) and waits until it answers
``/ping``; :func:`running_clickhouse` wraps it as a context manager. The binary:
``$TANDEM_CLICKHOUSE_SERVER``, else ``clickhouse-server`` on PATH or in /usr/sbin
(Debian's package, 18.16), else ``clickhouse server`` (upstream's single binary).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CONFIG_XML = """<?xml version="1.0"?>
<yandex>
  <logger>
    <level>warning</level>
    <log>{dir}/log/server.log</log>
    <errorlog>{dir}/log/server.err.log</errorlog>
    <size>10M</size>
    <count>1</count>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{tcp}</tcp_port>
  <http_port>{http}</http_port>
  <interserver_http_port>{interserver}</interserver_http_port>
  <interserver_http_host>127.0.0.1</interserver_http_host>
  <max_concurrent_queries>50</max_concurrent_queries>
  <uncompressed_cache_size>134217728</uncompressed_cache_size>
  <mark_cache_size>268435456</mark_cache_size>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mlock_executable>false</mlock_executable>
</yandex>
"""

USERS_XML = """<?xml version="1.0"?>
<yandex>
  <profiles>
    <default>
      <max_memory_usage>6000000000</max_memory_usage>
      <max_threads>2</max_threads>
    </default>
  </profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas>
    <default>
      <interval>
        <duration>3600</duration>
        <queries>0</queries><errors>0</errors><result_rows>0</result_rows>
        <read_rows>0</read_rows><execution_time>0</execution_time>
      </interval>
    </default>
  </quotas>
</yandex>
"""


def server_command() -> list[str] | None:
    env = os.environ.get("TANDEM_CLICKHOUSE_SERVER")
    if env:
        return env.split()
    for cand in (shutil.which("clickhouse-server"), "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"):
        if cand and os.access(cand, os.X_OK):
            return [cand]
    ch = shutil.which("clickhouse")
    return [ch, "server"] if ch else None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ClickHouseServer:
    """A clickhouse-server process of our own in ``directory``. ``start()`` waits until
    it answers ``/ping``; ``stop()`` is SIGTERM (then SIGKILL), ``kill()`` SIGKILL."""

    def __init__(self, directory: str | Path) -> None:
        cmd = server_command()
        if cmd is None:
            raise RuntimeError(
                "no clickhouse-server binary: run `make deps` (installs Debian's "
                "clickhouse-server), set TANDEM_CLICKHOUSE_SERVER to the binary, or "
                "TANDEM_TEST_CLICKHOUSE_URL to a running server"
            )
        self.cmd = cmd
        self.dir = Path(directory)
        self.tcp_port, self.http_port, self.interserver_port = free_ports(3)
        for sub in ("log", "data", "tmp", "user_files", "format_schemas"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "config.xml").write_text(CONFIG_XML.format(
            dir=self.dir, tcp=self.tcp_port, http=self.http_port, interserver=self.interserver_port))
        (self.dir / "users.xml").write_text(USERS_XML)
        self.proc: subprocess.Popen | None = None
        self.controllable = True

    @property
    def url(self) -> str:
        return f"clickhouse://127.0.0.1:{self.tcp_port}"

    def store_url(self, database: str) -> str:
        return f"{self.url}/{database}"

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ping", timeout=1) as r:
                return r.read().strip() == b"Ok."
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        out = open(self.dir / "log" / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            [*self.cmd, f"--config-file={self.dir / 'config.xml'}"],
            cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"clickhouse-server exited with {self.proc.returncode}; see "
                    f"{self.dir / 'log'} (server.err.log, stdout.log)")
            if self.ping():
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"clickhouse-server did not answer within {timeout} s; see {self.dir / 'log'}")

    def stop(self, timeout: float = 30.0) -> None:
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: int, timeout: float) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ExternalClickHouse:
    """A server given by TANDEM_TEST_CLICKHOUSE_URL: never started or stopped here."""

    controllable = False

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def store_url(self, database: str) -> str:
        return f"{self.url}/{database}"


@contextlib.contextmanager
def running_clickhouse(directory: str | Path | None = None):
    """A started :class:`ClickHouseServer` in ``directory`` (default: a temp dir)."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-ch-"))
        srv = ClickHouseServer(directory)
        try:
            srv.start()
            yield srv
        finally:
            srv.stop()


