"""A local clickhouse-server of our own: for tests, benchmarks and trying things out.

:class:`ClickHouseServer` writes a minimal config.xml/users.xml into a directory, starts
the server on free loopback ports (tcp, http, interserver) and waits until it answers
``/ping``; :func:`running_clickhouse` wraps it as a context manager. The binary:
``$TANDEM_CLICKHOUSE_SERVER``, else ``clickhouse-server`` on PATH or in /usr/sbin
(Debian's package, 18.16), else ``clickhouse server`` (upstream's single binary).

With ``tls_dir`` (a Tandem TLS directory, ``tandem certs init``) it serves TLS only: the
native protocol on ``tcp_port_secure`` and HTTP on ``https_port``, no plaintext port at
all (no ``tcp_port``, ``http_port`` or interserver port), with the certificate
``TLS_DIR/clickhouse-local.crt`` (issued by the directory's CA when missing: IP SAN
127.0.0.1) and client certificates required and checked against ``TLS_DIR/ca.crt`` only
(``verificationMode`` strict, ``loadDefaultCAFile`` false: the system's CAs are not
trusted for clients). TLS 1.2 (ECDHE with AES-GCM or ChaCha20-Poly1305) and TLS 1.3.
What 18.16 cannot do: map a client certificate to a user (any certificate of the CA gets
in; users.xml still decides who may do what), reload renewed certificate files (a
restart picks them up). Its ``url`` is then
``clickhouses://127.0.0.1:PORT?ca=…&cert=…&key=…`` (the client pair: ``client``, by
default the server's own, which is also a client certificate of the CA).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape

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
{ports}  <max_concurrent_queries>50</max_concurrent_queries>
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

PLAIN_PORTS_XML = """  <tcp_port>{tcp}</tcp_port>
  <http_port>{http}</http_port>
  <interserver_http_port>{interserver}</interserver_http_port>
  <interserver_http_host>127.0.0.1</interserver_http_host>
"""

# TLS only (checked on Debian's 18.16 with its system OpenSSL 3 and Poco 1.11): without
# loadDefaultCAFile=false a client certificate of any CA the system trusts gets in;
# without the RejectCertificateHandler, Poco's default handler asks on the server's
# stdin whether to accept a client certificate that fails verification.
TLS_PORTS_XML = """  <tcp_port_secure>{tcp}</tcp_port_secure>
  <https_port>{http}</https_port>
  <openSSL>
    <server>
      <certificateFile>{cert}</certificateFile>
      <privateKeyFile>{key}</privateKeyFile>
      <caConfig>{ca}</caConfig>
      <loadDefaultCAFile>false</loadDefaultCAFile>
      <verificationMode>strict</verificationMode>
      <invalidCertificateHandler><name>RejectCertificateHandler</name></invalidCertificateHandler>
      <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
      <cipherList>{ciphers}</cipherList>
      <preferServerCiphers>true</preferServerCiphers>
      <cacheSessions>false</cacheSessions>
    </server>
  </openSSL>
"""

#: TLS 1.2 suites (TLS 1.3 has its own, all AEAD): forward secrecy and AEAD only.
TLS12_CIPHERS = ":".join(f"ECDHE-{k}-{c}" for k in ("ECDSA", "RSA")
                         for c in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305"))
#: The server's identity in a TLS directory (a serverAuth + clientAuth leaf of its CA).
SERVER_KIND, SERVER_NAME = "clickhouse", "local"
SERVER_STEM = f"{SERVER_KIND}-{SERVER_NAME}"
SERVER_HOSTS = ("127.0.0.1", "localhost")

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


def with_database(url: str, database: str) -> str:
    """``url`` (maybe with a ``?query``) with ``/database`` as its path."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def server_identity(tls_dir: str | Path) -> tuple[Path, Path, Path]:
    """``(ca.crt, clickhouse-local.crt, clickhouse-local.key)`` of ``tls_dir``; the pair is
    issued by the directory's CA when missing (PkiError without a CA key there)."""
    d = Path(tls_dir)
    cert, key = d / f"{SERVER_STEM}.crt", d / f"{SERVER_STEM}.key"
    if not cert.is_file() or not key.is_file():
        from router.security import pki

        pki.issue(d, SERVER_KIND, SERVER_NAME, hosts=SERVER_HOSTS)
    return d / "ca.crt", cert, key


class ClickHouseServer:
    """A clickhouse-server process of our own in ``directory``. ``start()`` waits until
    it answers ``/ping``; ``stop()`` is SIGTERM (then SIGKILL), ``kill()`` SIGKILL.
    ``tls_dir``: TLS only (see the module docstring); ``client``: the identity (file stem
    in ``tls_dir``) whose pair :attr:`url` names, by default the server's own."""

    def __init__(self, directory: str | Path, *, tls_dir: str | Path | None = None,
                 client: str | None = None) -> None:
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
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        if self.tls_dir is None:
            ports = PLAIN_PORTS_XML.format(tcp=self.tcp_port, http=self.http_port, interserver=self.interserver_port)
            self.client_files: tuple[Path, Path, Path] | None = None
        else:
            ca, cert, key = server_identity(self.tls_dir)
            ports = TLS_PORTS_XML.format(tcp=self.tcp_port, http=self.http_port, ca=escape(str(ca)),
                                         cert=escape(str(cert)), key=escape(str(key)), ciphers=TLS12_CIPHERS)
            stem = client or SERVER_STEM
            self.client_files = (ca, self.tls_dir / f"{stem}.crt", self.tls_dir / f"{stem}.key")
        (self.dir / "config.xml").write_text(CONFIG_XML.format(dir=self.dir, ports=ports))
        (self.dir / "users.xml").write_text(USERS_XML)
        self.proc: subprocess.Popen | None = None
        self.controllable = True

    @property
    def secure(self) -> bool:
        return self.tls_dir is not None

    @property
    def url(self) -> str:
        if self.client_files is None:
            return f"clickhouse://127.0.0.1:{self.tcp_port}"
        ca, cert, key = self.client_files
        query = urlencode({"ca": str(ca), "cert": str(cert), "key": str(key)}, safe="/")
        return f"clickhouses://127.0.0.1:{self.tcp_port}?{query}"

    def store_url(self, database: str) -> str:
        return with_database(self.url, database)

    def ping(self) -> bool:
        try:
            if self.client_files is None:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ping", timeout=1) as r:
                    return r.read().strip() == b"Ok."
            ca, cert, key = self.client_files
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.load_cert_chain(str(cert), str(key))
            with urllib.request.urlopen(f"https://127.0.0.1:{self.http_port}/ping", timeout=1, context=ctx) as r:
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
        return with_database(self.url, database)


@contextlib.contextmanager
def running_clickhouse(directory: str | Path | None = None, **kw):
    """A started :class:`ClickHouseServer` in ``directory`` (default: a temp dir);
    ``kw``: ``tls_dir``, ``client``."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-ch-"))
        srv = ClickHouseServer(directory, **kw)
        try:
            srv.start()
            yield srv
        finally:
            srv.stop()


