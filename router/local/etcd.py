"""A throw-away etcd for the demo and the benchmarks (Debian's ``/usr/bin/etcd``).

:func:`etcd_server` is a context manager: one single-member etcd with its client and
peer ports on free loopback ports and its data in a fresh directory (under ``root`` if
given, else a temp dir on tmpfs when there is one: etcd 3.4 has no ``--unsafe-no-fsync``
and fsync is slow on small VMs). It waits until ``/health`` answers, yields the
:class:`EtcdServer`, and on exit kills the server and removes its data.

With ``tls_dir`` (a Tandem TLS directory, ``tandem certs init DIR``) it serves its clients
over mTLS with the cluster's own CA: its client URL is ``https://``, its certificate the
etcd identity ``DIR/etcd-NAME.crt|.key`` (``tandem certs issue DIR --etcd NAME --host
127.0.0.1``; ``spiffe://TRUST_DOMAIN/etcd/NAME``) and it requires a client certificate
signed by ``DIR/ca.crt`` (``--client-cert-auth``). A node then joins with nothing else
given: ``tandem node --tls-dir DIR --etcd https://127.0.0.1:PORT`` presents its site
certificate. The peer URL stays plaintext on loopback (one member, no peers).

Given the cluster's site and operator names too (``etcd_server(tls_dir=DIR,
sites=[…], operators=["admin"], prefix="/tandem/")``), it also turns on etcd's own access
control (:mod:`router.coord.access`): each site's and operator's certificate CN becomes an
etcd user that may read and write under the prefix (a site only reads the role bindings
under ``PREFIX security/``), the first operator holds etcd's root
role (it provisions, with ``DIR/operator-NAME.crt``), and every other identity of the CA
(partners, agents gateways) is refused.

The server is started through :func:`router.local.nodes.pdeathsig_argv` (it gets SIGTERM
if the process that started it dies) and in its own session (a Ctrl-C in the terminal
reaches the demo, which stops it in order). ``tests/etcd_fixtures.py`` extends it for
the tests (pause/resume, etcdctl).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from router.local.nodes import pdeathsig_argv

ETCD_ENV = "TANDEM_ETCD_BIN"


def etcd_binary() -> str:
    return os.environ.get(ETCD_ENV) or shutil.which("etcd") or "/usr/bin/etcd"


class EtcdStartError(RuntimeError):
    """etcd is not installed, exited, or did not become healthy in time."""


DEFAULT_IDENTITY = "local"  # the etcd identity of a throw-away server: DIR/etcd-local.crt


def tls_from_dir(tls_dir: str | Path, name: str = DEFAULT_IDENTITY) -> dict[str, Path]:
    """The :class:`EtcdServer` ``tls`` files of a Tandem TLS directory: ``DIR/ca.crt`` is the
    CA clients must come from, the etcd identity ``DIR/etcd-NAME.crt|.key`` is the server's
    certificate (and the client certificate of the health check: it has clientAuth too).
    EtcdStartError when a file is missing, the key does not belong to the certificate, or
    the certificate is not ``etcd/NAME``."""
    from router.security import pki, spiffe

    d = Path(tls_dir)
    stem = f"etcd-{name}"
    if not (d / pki.CA_CERT).is_file():
        raise EtcdStartError(f"no {d / pki.CA_CERT}: not a TLS directory (tandem certs init DIR)")
    try:
        cert_pem, _ = pki.load_pair(d, stem, attempts=20)
        ident = pki.identity_of(cert_pem)
    except pki.PkiError as e:
        raise EtcdStartError(f"etcd's certificate: {e} (tandem certs issue {d} --etcd {name} "
                             f"--host 127.0.0.1)") from None
    except spiffe.IdentityError as e:
        raise EtcdStartError(f"{d / stem}.crt: {e}") from None
    if (ident.kind, ident.name) != ("etcd", name):
        raise EtcdStartError(f"{d / stem}.crt is {ident.uri}, not an etcd/{name} identity")
    cert, key = d / f"{stem}.crt", d / f"{stem}.key"
    return {"ca": d / pki.CA_CERT, "server_cert": cert, "server_key": key, "client_cert": cert, "client_key": key}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """A single-member etcd on 127.0.0.1 with its data in ``data_dir``."""

    def __init__(self, data_dir: Path, client_port: int | None = None, peer_port: int | None = None,
                 tls: dict[str, Path] | None = None, *, detach: bool = False,
                 log_path: Path | None = None) -> None:
        """``tls``: {"ca", "server_cert", "server_key", "client_cert", "client_key"} paths
        (:func:`tls_from_dir` makes them from a Tandem TLS directory); clients then need
        https and a client certificate signed by ``ca``. ``detach``: no parent-death
        signal, the server outlives the process that started it (``tandem up``).
        ``log_path``: default ``DATA_DIR.log`` beside the data dir."""
        self.tls = tls
        self.detach = detach
        self.binary = etcd_binary()
        if not (os.path.exists(self.binary) and os.access(self.binary, os.X_OK)):
            raise EtcdStartError(
                f"etcd not found at {self.binary}: install Debian's etcd-server (make deps does), "
                f"or set {ETCD_ENV}"
            )
        self.data_dir = Path(data_dir)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.endpoint,)

    @property
    def url(self) -> str:
        """The client URL with its scheme: ``https://…`` when the server has TLS (what a
        node's ``--etcd`` takes to dial it with TLS), else ``http://…``."""
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url,)

    def _args(self) -> list[str]:
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls = []
        if self.tls:
            tls = ["--cert-file", str(self.tls["server_cert"]), "--key-file", str(self.tls["server_key"]),
                   "--trusted-ca-file", str(self.tls["ca"]), "--client-cert-auth"]
        return [*tls,
            "--name", "tandem", "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"tandem={peer}",
            "--initial-cluster-state", "new", "--initial-cluster-token", uuid.uuid4().hex,
            "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> None:
        """Start (or restart, same ports and data) and wait until it answers /health."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            cmd = [self.binary, *self._args()]
            self.proc = subprocess.Popen(
                cmd if self.detach else pdeathsig_argv(cmd), stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdStartError(
                    f"etcd exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise EtcdStartError(f"etcd did not become healthy within {timeout:g} s; see {self.log_path}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        ctx = None
        if self.tls:
            import ssl

            ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
            ctx.load_cert_chain(str(self.tls["client_cert"]), str(self.tls["client_key"]))
        scheme = "https" if self.tls else "http"
        try:
            with urllib.request.urlopen(f"{scheme}://{self.endpoint}/health", timeout=0.5, context=ctx) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL and reap (no-op when not running)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused etcd dies as well
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def tmp_root() -> Path:
    """Where throw-away etcd data goes: tmpfs when there is one (fsync is slow on disks)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def provision_access(server: EtcdServer, tls_dir: str | Path, sites: Iterable[str],
                     operators: Iterable[str] = ("admin",), prefix: str | None = None,
                     rebalancers: Iterable[str] = ()) -> list[str]:
    """Turn on etcd's access control on a running TLS ``server`` for the identities of
    ``tls_dir`` (:func:`router.coord.access.provision`): ``sites`` and ``operators`` may
    read and write under ``prefix`` (default ``/tandem/``), nobody else; connected as the
    first operator (``DIR/operator-NAME.crt``), which gets etcd's root role. Idempotent;
    returns the changes made. EtcdStartError when it fails."""
    from router.coord import access
    from router.coord.keys import DEFAULT_PREFIX
    from router.coord.link import EtcdSettings

    operators = list(operators)
    if server.tls is None or not operators:
        raise EtcdStartError("etcd's access control needs a TLS server and at least one operator")
    d = Path(tls_dir)
    settings = EtcdSettings(endpoints=server.urls, prefix=prefix or DEFAULT_PREFIX, op_timeout_s=5.0,
                            ca_file=str(d / "ca.crt"), cert_file=str(d / f"operator-{operators[0]}.crt"),
                            key_file=str(d / f"operator-{operators[0]}.key"))
    try:
        return access.run_blocking(access.provision(settings, sites=list(sites), operators=operators,
                                                    rebalancers=list(rebalancers)))
    except (access.AccessError, OSError, ValueError) as e:
        raise EtcdStartError(f"etcd's access control: {e}") from None


@contextlib.contextmanager
def etcd_server(root: Path | None = None, tls_dir: str | Path | None = None,
                identity: str = DEFAULT_IDENTITY, *, sites: Iterable[str] | None = None,
                operators: Iterable[str] = ("admin",), prefix: str | None = None) -> Iterator[EtcdServer]:
    """A running etcd with its data in a fresh directory under ``root`` (default: a temp
    dir on tmpfs if there is one), killed and its data removed on exit. With ``tls_dir``,
    mTLS from that Tandem TLS directory with the etcd identity ``etcd/IDENTITY`` (see
    :func:`tls_from_dir`; clients dial :attr:`EtcdServer.urls`). With ``sites`` too (names,
    may be empty), etcd's access control is on before it is yielded: only those sites and
    ``operators`` may use it, under ``prefix`` (see :func:`provision_access`)."""
    tls = tls_from_dir(tls_dir, identity) if tls_dir is not None else None
    if sites is not None and tls_dir is None:
        raise EtcdStartError("etcd's access control (sites=…) needs tls_dir")
    base = Path(root) if root is not None else tmp_root()
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="etcd-", dir=base))
    server = EtcdServer(d / "data", tls=tls)
    try:
        server.start()
        if sites is not None:
            provision_access(server, tls_dir, sites, operators, prefix)
        yield server
    finally:
        server.kill()
        shutil.rmtree(d, ignore_errors=True)
