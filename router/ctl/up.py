"""``tandem up`` / ``tandem down``: a local cluster in the background (registered by
:func:`register`).

``tandem up --data-dir D [--sites DIR] [--traffic] [--history embedded|off]
[--time-scale N] [--timeout S]`` starts, from any directory:

* the cluster's identities in ``D/tls`` (``tandem certs init``, kept when there; plus the
  etcd server identity ``etcd-local``);
* etcd 3.4 over mTLS (client certificates of the cluster's CA, etcd's access control on:
  only the sites and the operator ``admin`` may use it), its data on tmpfs (fsync is slow
  on small machines; etcd only holds what the nodes publish again and the policy written
  again at every ``up``), its log in ``D/etcd.log``;
* the overflow policy (``DIR/overflow-policy.json``, else the demo's) under ``/tandem/``;
* one node per site file, detached (own session, no parent-death signal), on a copy of
  the site file in ``D/sites`` with every duration divided by the time scale, data in
  ``D/nodes/SITE`` (journal, embedded history), log in ``D/nodes/SITE/node.log``, mTLS
  with ``D/tls``, Prometheus metrics on a free loopback port;
* the rebalancer (``tandem rebalancer``, identity ``rebalancer-rebalancer``, its etcd user
  provisioned too) on a free loopback port, named in the context (``tandem ctl plan``,
  ``tandem ctl apply``), log ``D/rebalancer.log``;
* with ``--traffic``, :mod:`router.ctl.traffic` (the demo's callers and agents until
  ``tandem down``; log ``D/traffic.log``).

It returns once every node answers its gRPC health check over mTLS as ``operator-admin``
and is a member of the cluster (and, with ``--traffic``, the agents are signed in), after
writing the context file ``D/tandem.yaml`` (:mod:`router.ctl.context`) and the run-state
``D/run.json`` (:mod:`router.ctl.runstate`). Time scale: ``--time-scale`` simulated
seconds per real second, default the demo's 60 with ``--traffic`` (an hour of traffic a
minute: queues, overflow and service levels move while you watch) and 1 without (real
time: calls you offer yourself wait as long as the site files say).

``tandem down --data-dir D`` stops, in order, the traffic, the rebalancer, the nodes (they drain; queued
calls stay in their journals and come back with the next ``up``), then etcd: SIGTERM,
then SIGKILL after a timeout. The context file stays (the next ``up`` rewrites it).

Exit codes: 0 ok (``down``: also when nothing was running); 1 error (``up``: a cluster
already runs in D, or it could not start — what it started is stopped again and the end
of the failing log is printed; ``down``: a process would not die); 2 bad arguments or
site files; 130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer

from router.ctl import runstate

DEFAULT_TIMEOUT_S = 90.0
ETCD_IDENTITY = "local"  # the etcd server's certificate: D/tls/etcd-local.crt
OPERATOR = "admin"  # the identity of the context file and of etcd's root
ETCD_DIR_PREFIX = "tandem-up-etcd-"
CONTEXT_FILE = "tandem.yaml"
CONTEXT_NAME = "local"
TRAFFIC_READY = "offering calls"  # the traffic log's line once its agents are in
REBALANCER = "rebalancer"  # its identity: D/tls/rebalancer-rebalancer.crt
REBALANCER_READY = "serving on port"  # the rebalancer log's line once it serves


class StartError(RuntimeError):
    """The cluster did not come up (the message says what and quotes the log)."""


def register(app: typer.Typer) -> None:
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)


def _fail(msg: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


# --- tandem up ---------------------------------------------------------------------------


def up_cmd(
    data_dir: Path = typer.Option(..., "--data-dir", help="the cluster's directory (TLS, journals, logs, context)"),
    sites: Optional[Path] = typer.Option(None, "--sites", help="directory of site files (default: the example "
                                                               "cluster shipped with tandem)"),
    traffic: bool = typer.Option(False, "--traffic", help="keep the demo's callers and agents playing until "
                                                          "tandem down"),
    history: str = typer.Option("embedded", "--history", metavar="embedded|off",
                                help="interaction history of each node (embedded: chdb in its data dir)"),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", metavar="N",
                                               help="simulated seconds per real second (default 60 with "
                                                    "--traffic, else 1)"),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout", help="seconds to wait for the cluster"),
) -> None:
    """Start etcd, one node per site file and the embedded history in the background, over mTLS.

    Returns once every node serves; writes the context file DATA_DIR/tandem.yaml."""
    if history not in ("embedded", "off"):
        _fail(f"--history must be embedded or off, not {history!r}", 2)
    if time_scale is not None and not time_scale > 0:
        _fail("--time-scale must be positive", 2)
    raise typer.Exit(up(data_dir, sites, traffic=traffic, history=history, time_scale=time_scale,
                        timeout=timeout))


def up(data_dir: Path, sites_dir: Path | None = None, *, traffic: bool = False, history: str = "embedded",
       time_scale: float | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """``tandem up``; returns the exit code (see the module docstring)."""
    from router.config import ConfigError, load_sites
    from router.sim.demo import DEMO_TIME_SCALE, example_sites_dir

    d = Path(data_dir).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    previous_run = runstate.load(d)
    live = runstate.running(previous_run)
    if live:
        _say(f"a cluster already runs in {d} ({', '.join(f'{label} pid {pid}' for label, pid, _ in live)}); "
             f"stop it with: tandem down --data-dir {d}")
        return 1
    if previous_run is not None:  # a run that ended without tandem down (killed, rebooted)
        _remove_etcd_data(previous_run)
        runstate.remove(d)
    sites_dir = Path(sites_dir or example_sites_dir()).expanduser().resolve()
    try:
        sites = load_sites(sites_dir)
    except ConfigError as e:
        _say(f"error: {e}")
        return 2
    if not sites:
        _say(f"error: no site files (*.yaml) in {sites_dir}")
        return 2
    scale = time_scale if time_scale is not None else (DEMO_TIME_SCALE if traffic else 1.0)
    run = _Starter(d, sites_dir, sites, scale=scale, history=history, traffic=traffic, timeout=timeout)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM cleans up like Ctrl-C
    try:
        run.start()
    except StartError as e:
        run.stop()
        _say(f"error: the cluster did not start, everything started was stopped again:\n{e}")
        return 1
    except KeyboardInterrupt:
        run.stop()
        _say("interrupted: everything started was stopped again")
        return 130
    except BaseException:
        run.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    run.summary()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _Starter:
    """One ``tandem up``: starts the parts in order and records them in the run-state;
    :meth:`stop` undoes what was started (after a failure)."""

    def __init__(self, d: Path, sites_dir: Path, sites: list, *, scale: float, history: str, traffic: bool,
                 timeout: float) -> None:
        self.d, self.sites_dir, self.sites = d, sites_dir, sites
        self.names = [s.site.name for s in sites]
        self.scale, self.history, self.traffic, self.timeout = scale, history, traffic, timeout
        self.tls = d / "tls"
        self.etcd = None  # router.local.etcd.EtcdServer
        self.etcd_dir: Path | None = None
        self.nodes: list = []  # router.local.nodes.NodeProcess
        self.traffic_proc: subprocess.Popen | None = None
        self.rebalancer_proc: subprocess.Popen | None = None
        self.rebalancer_address = ""
        self.doc: dict = {
            "version": runstate.VERSION, "data_dir": str(d), "state": "starting", "started_at": time.time(),
            "time_scale": scale, "history": history, "sites_dir": str(sites_dir),
            "etcd": None, "nodes": {}, "traffic": None, "rebalancer": None,
        }

    @property
    def context_path(self) -> Path:
        return self.d / CONTEXT_FILE

    def start(self) -> None:
        from router.local.etcd import EtcdServer, EtcdStartError, provision_access, tls_from_dir, tmp_root
        from router.local.nodes import NodeStartError, spawn_node, wait_listening
        from router.sim.demo import write_scaled_sites

        self._certs()
        files = write_scaled_sites(self.sites, self.d / "sites", self.scale)
        policy = self._policy()
        runstate.save(self.d, self.doc)
        _say(f"tandem up: {len(self.sites)} sites ({', '.join(self.names)}) in {self.d}, time x{self.scale:g}")
        try:
            self.etcd_dir = Path(tempfile.mkdtemp(prefix=ETCD_DIR_PREFIX, dir=tmp_root()))
            self.etcd = EtcdServer(self.etcd_dir / "data", tls=tls_from_dir(self.tls, ETCD_IDENTITY), detach=True,
                                   log_path=self.d / "etcd.log")
            self.etcd.start(timeout=min(30.0, self.timeout))
            self.doc["etcd"] = {"pid": self.etcd.proc.pid, "marker": str(self.etcd.data_dir), "url": self.etcd.url,
                                "data_dir": str(self.etcd_dir)}
            runstate.save(self.d, self.doc)
            provision_access(self.etcd, self.tls, self.names, [OPERATOR], rebalancers=[REBALANCER])
        except EtcdStartError as e:
            raise StartError(f"etcd: {e}") from None
        metrics_flag = _node_has_metrics_listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_ETCD_")}
        env.setdefault("PYTHONUNBUFFERED", "1")
        args = ["--tls-dir", str(self.tls), "--etcd", self.etcd.url, "--etcd-prefix", _prefix(),
                "--history", self.history]
        metrics: dict[str, str] = {}
        for f, name in zip(files, self.names):
            node_env, extra = dict(env), list(args)
            if metrics_flag:
                extra += ["--metrics-listen", "127.0.0.1:0"]
            else:  # an older `tandem node`: a free port through the environment
                from router.local.etcd import free_port

                node_env["TANDEM_METRICS_PORT"] = str(free_port())
                metrics[name] = f"127.0.0.1:{node_env['TANDEM_METRICS_PORT']}"
            node = spawn_node(f, self.d / "nodes" / name, extra_args=extra, env=node_env, detach=True)
            self.nodes.append(node)
            self.doc["nodes"][name] = {"pid": node.pid, "marker": str(self.d), "address": "", "metrics": ""}
            runstate.save(self.d, self.doc)
        try:
            wait_listening(self.nodes, self.timeout, metrics=metrics_flag)
        except NodeStartError as e:
            raise StartError(str(e)) from None
        for n in self.nodes:
            metrics[n.name] = n.metrics or metrics.get(n.name, "")
            self.doc["nodes"][n.name].update(address=n.address, metrics=metrics[n.name])
        runstate.save(self.d, self.doc)
        self.addresses = {n.name: n.address for n in self.nodes}
        try:
            asyncio.run(self._join(policy))
        except StartError as e:
            raise StartError(f"{e}\n{self._node_logs()}") from None
        self._start_rebalancer()
        self._write_context(metrics)
        if self.traffic:
            self._start_traffic()
        self.doc["state"] = "running"
        runstate.save(self.d, self.doc)

    # --- the parts ------------------------------------------------------------------------

    def _certs(self) -> None:
        from router.security import pki
        from router.sim.demo import make_certs

        try:
            make_certs(self.sites, self.tls)
            missing = [f"{kind}-{n}.crt" for n in self.names for kind in ("site", "agents")
                       if not (self.tls / f"{kind}-{n}.crt").exists()]
            if not (self.tls / f"operator-{OPERATOR}.crt").exists():
                missing.append(f"operator-{OPERATOR}.crt")
            if missing:
                raise StartError(f"{self.tls} was made for other sites: no {', '.join(missing)} (tandem certs "
                                 f"issue {self.tls} --site NAME, or another --data-dir)")
            if not (self.tls / f"etcd-{ETCD_IDENTITY}.crt").exists():
                pki.issue(self.tls, "etcd", ETCD_IDENTITY, hosts=("127.0.0.1", "localhost"))
        except pki.PkiError as e:
            raise StartError(f"certificates in {self.tls}: {e}") from None

    def _policy(self) -> dict:
        from router.sim.demo import DEMO_POLICY

        p = self.sites_dir / "overflow-policy.json"
        if not p.exists():
            return dict(DEMO_POLICY)
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise StartError(f"{p}: {e}") from None

    async def _join(self, policy: dict) -> None:
        """Every node answers its health check over mTLS as the operator; the policy is in
        etcd and every node is a member with its load published."""
        from router.sim.demo import RunFailed, cluster_up

        deadline = time.monotonic() + self.timeout
        await wait_serving(self.addresses, self.tls, f"operator-{OPERATOR}", self.timeout)
        ops = {"ca_file": str(self.tls / "ca.crt"), "cert_file": str(self.tls / f"operator-{OPERATOR}.crt"),
               "key_file": str(self.tls / f"operator-{OPERATOR}.key")}
        try:
            await cluster_up(self.etcd.urls, _prefix(), self.names, policy,
                             timeout=max(5.0, deadline - time.monotonic()), etcd_tls=ops)
        except (RunFailed, OSError, asyncio.TimeoutError) as e:
            raise StartError(f"joining the cluster: {type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001 - etcd client errors: say which, stop what started
            raise StartError(f"writing the overflow policy to etcd: {type(e).__name__}: {e}") from None

    def _write_context(self, metrics: dict[str, str]) -> None:
        from router.ctl import context

        ctx = context.Context(sites=dict(self.addresses), tls_dir=self.tls, identity=f"operator-{OPERATOR}",
                              metrics={k: v for k, v in metrics.items() if v}, data_dir=self.d,
                              rebalancer=self.rebalancer_address or None)
        context.save(self.context_path, context.single(CONTEXT_NAME, ctx))

    def _start_rebalancer(self) -> None:
        """``tandem rebalancer`` over mTLS with the ``rebalancer`` identity, on a free
        loopback port, with the cluster's sites and etcd (it campaigns; it leads alone)."""
        from router.local.etcd import free_port

        address = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "router.cli", "rebalancer", "--sites", str(self.sites_dir), "--etcd",
               self.etcd.url, "--etcd-prefix", _prefix(), "--tls-dir", str(self.tls), "--identity", REBALANCER,
               "--data-dir", str(self.d / "rebalancer"), "--listen", address]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_ETCD_")}
        self.rebalancer_proc = self._spawn("rebalancer", cmd, env, REBALANCER_READY, "did not serve",
                                           address=address)
        self.rebalancer_address = address

    def _start_traffic(self) -> None:
        cmd = [sys.executable, "-m", "router.ctl.traffic", "--data-dir", str(self.d), "--sites", str(self.sites_dir),
               "--time-scale", f"{self.scale:g}"]
        self.traffic_proc = self._spawn("traffic", cmd, dict(os.environ), TRAFFIC_READY,
                                        "'s agents were not signed in")

    def _spawn(self, what: str, cmd: list[str], env: dict, ready: str, late: str, **extra: str) -> subprocess.Popen:
        """Start ``cmd`` detached with its log in ``D/WHAT.log``, record it in the run-state
        as ``what``, and return once its log says ``ready`` (StartError if it exits or is
        not ready within a minute: "the WHAT LATE within …")."""
        log_path = self.d / f"{what}.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(env, PYTHONUNBUFFERED="1"))
        self.doc[what] = {"pid": proc.pid, "marker": str(self.d), **extra}
        runstate.save(self.d, self.doc)
        wait = min(60.0, self.timeout)
        deadline = time.monotonic() + wait
        while True:
            text = _read_from(log_path, offset)
            if ready in text:
                return proc
            if proc.poll() is not None:
                raise StartError(f"the {what} exited with {proc.returncode}; {log_path}:\n{_tail(text)}")
            if time.monotonic() > deadline:
                sep = "" if late.startswith("'") else " "
                raise StartError(f"the {what}{sep}{late} within {wait:g} s; {log_path}:\n{_tail(text)}")
            time.sleep(0.1)

    # --- undo -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop what this run started (traffic, rebalancer, nodes, etcd), remove etcd's data and the
        run-state. Never raises."""
        from router.local.nodes import stop_nodes

        for proc in (self.traffic_proc, self.rebalancer_proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        stop_nodes(self.nodes, 15)
        if self.etcd is not None:
            self.etcd.stop()
        if self.etcd_dir is not None:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
        runstate.remove(self.d)

    def _node_logs(self) -> str:
        return "\n".join(f"--- node {n.name} ({'running' if n.alive() else 'exited'}), {n.log_path}:\n"
                         f"{n.log_tail(10)}" for n in self.nodes)

    def summary(self) -> None:
        lines = [f"tandem cluster up in {self.d} (time x{self.scale:g}"
                 f"{', traffic playing' if self.traffic else ''}; history {self.history})"]
        width = max(len(n) for n in self.names)
        for n in self.nodes:
            m = self.doc["nodes"][n.name]["metrics"]
            extra = f"  metrics {m}" if m else ""
            lines.append(f"  {n.name:<{width}}  {n.address}  pid {n.pid}  log {n.log_path}{extra}")
        lines.append(f"  etcd  {self.etcd.url}  pid {self.etcd.proc.pid}  log {self.etcd.log_path}")
        if self.rebalancer_proc is not None:
            lines.append(f"  rebalancer  {self.rebalancer_address}  pid {self.rebalancer_proc.pid}  "
                         f"log {self.d / 'rebalancer.log'}")
        if self.traffic_proc is not None:
            lines.append(f"  traffic  pid {self.traffic_proc.pid}  log {self.d / 'traffic.log'}")
        lines += [f"context: {self.context_path} (identity operator-{OPERATOR}, TLS {self.tls})",
                  f"  export TANDEM_CONTEXT={self.context_path}",
                  f"stop with: tandem down --data-dir {self.d}"]
        typer.echo("\n".join(lines))


async def wait_serving(addresses: dict[str, str], tls_dir: Path, identity: str, timeout: float) -> None:
    """Until every node (site name -> address) answers the gRPC health check SERVING over
    mTLS as ``identity`` (a file stem of ``tls_dir``), proving it is that site. Raises
    StartError after ``timeout`` seconds."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from router.security.tls import ChannelFactory, TlsFiles
    from router.sim.rpc import describe

    factory = ChannelFactory(TlsFiles(tls_dir, identity))
    deadline = time.monotonic() + timeout
    try:
        for name, address in addresses.items():
            stub = health_pb2_grpc.HealthStub(factory.channel(address, factory.expect("site", name)))
            last = "no answer"
            while True:
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                except grpc.aio.AioRpcError as e:
                    last = describe(e)
                if time.monotonic() > deadline:
                    raise StartError(f"node {name} at {address} does not answer its health check over mTLS as "
                                     f"{identity} within {timeout:g} s: {last}")
                await asyncio.sleep(0.1)
    finally:
        await factory.close_all()


def _prefix() -> str:
    from router.coord.keys import DEFAULT_PREFIX

    return DEFAULT_PREFIX


def _node_has_metrics_listen() -> bool:
    """Whether ``tandem node`` takes ``--metrics-listen`` (newer nodes; it reaches
    ``run_node(metrics_listen=…)``). Older ones serve metrics on ``$TANDEM_METRICS_PORT``."""
    import inspect

    from router.node.main import run_node

    return "metrics_listen" in inspect.signature(run_node).parameters


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str, n: int = 20) -> str:
    return "\n".join(text.splitlines()[-n:])


# --- tandem down -------------------------------------------------------------------------


def down_cmd(
    data_dir: Path = typer.Option(..., "--data-dir", help="the cluster's directory (as given to tandem up)"),
    timeout: float = typer.Option(20.0, "--timeout", help="seconds each stage may take before SIGKILL"),
) -> None:
    """Stop what tandem up started in DATA_DIR: the traffic, the nodes (queued calls stay in
    their journals), then etcd. Exits 0 also when nothing was running."""
    raise typer.Exit(down(data_dir, timeout=timeout))


def down(data_dir: Path, timeout: float = 20.0) -> int:
    """``tandem down``; returns the exit code (see the module docstring)."""
    d = Path(data_dir).expanduser().resolve()
    doc = runstate.load(d)
    if doc is None:
        _say(f"nothing running in {d} (no {runstate.FILE})")
        return 0
    procs = runstate.processes(doc)
    if not runstate.running(doc):
        _remove_etcd_data(doc)
        runstate.remove(d)
        _say(f"nothing running in {d} (removed a stale {runstate.FILE})")
        return 0
    stuck = []
    stages = [[p for p in procs if p[0] == "traffic"], [p for p in procs if p[0] == "rebalancer"],
              [p for p in procs if p[0].startswith("node ")],
              [p for p in procs if p[0] == "etcd"]]
    for stage in stages:
        t0 = time.monotonic()
        for label, how in runstate.terminate(stage, timeout).items():
            pid = next(pid for lbl, pid, _ in stage if lbl == label)
            typer.echo(f"{label} (pid {pid}): {how} ({time.monotonic() - t0:.1f} s)")
            if how == "still running":
                stuck.append(label)
    if stuck:
        _say(f"error: {', '.join(stuck)} would not stop; {runstate.path(d)} kept")
        return 1
    _remove_etcd_data(doc)
    runstate.remove(d)
    typer.echo(f"tandem cluster in {d} stopped (journals and history kept; tandem up --data-dir {d} resumes)")
    return 0


def _remove_etcd_data(doc: dict) -> None:
    """etcd's throw-away data dir (only one ``tandem up`` made: its name says so)."""
    e = doc.get("etcd") or {}
    p = Path(e.get("data_dir") or "")
    if p.name.startswith(ETCD_DIR_PREFIX) and p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
