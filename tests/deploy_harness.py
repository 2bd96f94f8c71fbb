"""The Ansible roles against real hosts: containers with systemd, reached over ssh.

``python tests/deploy_harness.py [--json] [--keep] [--image-only]`` (``make deploy-test``;
``tests/test_deploy_ansible.py`` runs it too) does, on this machine:

1. a base image ``localhost/tandem-deploy-base:<hash>`` — Debian bookworm by
   ``debootstrap --variant=minbase`` from the mirror apt already uses, with systemd,
   openssh-server, python3 and the Debian packages the roles install (installed again
   by them: ``state: present`` finds them), loaded with ``podman import``; kept in
   podman's store between runs (the hash covers the package list);
2. a podman network on a /24 of its own (10.231.N.0/24, free on this machine) and four
   containers on it with systemd as PID 1 (runc, ``--ulimit nofile=1024:1024 --ulimit
   nproc=4096:4096``): three in-house site hosts (each an etcd member and a node) and an
   operations host (ClickHouse, Prometheus and the BPO partner's gateway node);
3. an inventory like ``ansible/inventories/example`` for them (its group_vars, site files
   and topology; this run's addresses, ssh key and wheelhouse), the wheelhouse (the
   project's wheel built here, and its dependencies' wheels: the hosts have no index);
4. ``ansible-playbook site.yml`` twice: the first run changes things, the second must
   change nothing on any host;
5. a smoke test through ``tandem ctl`` with the operator certificate the PKI role made
   (every site serving and a member) and a call offered at toronto, whose agents are
   all signed out, answered by an agent at lyon — another host — after an overflow;
6. ``rolling-upgrade.yml`` to a new version (the same wheel repacked as 0.1.0.post1)
   under traffic (callers at the three in-house sites and every agent of the four sites
   signed in, :mod:`router.sim.loadgen`), then the reconciliation of every offered call
   with the nodes (:func:`router.sim.report.reconcile`): lost 0 and duplicates 0 wanted.

It prints one JSON line: ``{"hosts", "first_run_changed", "second_run_changed",
"smoke_overflowed", "upgrade_calls", "upgrade_lost", "upgrade_duplicates",
"node_unit_failures", "seconds"}`` (``node_unit_failures``: how often systemd marked a
node's unit failed, e.g. a stop that ran into its timeout — 0 wanted; on stderr the
details: ``upgraded_version``, ``upgrade_refused`` — offers a draining site turned away,
which a PBX routes elsewhere — and per-phase times), and exits 0 when every check
passed, 1 otherwise. Traffic goes only to the containers' subnet; the containers, the
network and the temporary directory are removed at the end (``--keep`` leaves them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
EXAMPLE = ANSIBLE_DIR / "inventories" / "example"
DEPLOY_VENV = ROOT / ".venv-deploy"
PODMAN_RUN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
# What the base image holds besides minbase: what Ansible and systemd need, and the
# packages the roles install (they are not reachable from the containers' subnet).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv", "python3-apt", "sudo",
            "iproute2", "procps", "ca-certificates", "etcd-server", "etcd-client", "clickhouse-server",
            "clickhouse-client", "prometheus", "prometheus-alertmanager")
IMAGE_REPO = "localhost/tandem-deploy-base"
MIRROR = "http://deb.debian.org/debian"
# host -> (last octet, groups, site)
HOSTS = {
    "lyon-1": (11, ("etcd", "tandem_sites"), "lyon"),
    "montreal-1": (12, ("etcd", "tandem_sites"), "montreal"),
    "toronto-1": (13, ("etcd", "tandem_sites"), "toronto"),
    "ops-1": (14, ("clickhouse", "prometheus", "tandem_partners"), "callpro"),
}
UPGRADE_VERSION = "0.1.0.post1"
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} deploy: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}… exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


# --- the base image ----------------------------------------------------------------------------


def image_tag() -> str:
    h = hashlib.sha256(" ".join(("bookworm", "minbase", *PACKAGES)).encode()).hexdigest()[:12]
    return f"{IMAGE_REPO}:{h}"


IMAGE_LOCK = Path("/var/tmp/tandem-deploy-image.lock")


def ensure_image(work: Path) -> tuple[str, bool]:
    """The base image's tag, built when podman's store lacks it; (tag, built now). One
    build at a time (a lock file): ``make test`` starts ``--image-only`` in the
    background before the test suite, and the deploy test waits for it here."""
    import fcntl

    with open(IMAGE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _ensure_image(work)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_image(work: Path) -> tuple[str, bool]:
    tag = image_tag()
    if run(["podman", "image", "exists", tag], check=False).returncode == 0:
        return tag, False
    rootfs = work / "rootfs"
    log(f"building {tag} with debootstrap (a few minutes, once per machine)")
    run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm", str(rootfs), MIRROR],
        timeout=1800)
    # Each container makes its own ssh host keys at start; root logs in with a key only.
    for k in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
        k.unlink()
    (rootfs / "etc" / "ssh" / "sshd_config.d" / "tandem.conf").write_text("PermitRootLogin prohibit-password\n")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        run(["podman", "import", "--change", 'CMD=["/sbin/init"]', "-", tag], stdin=tar.stdout, timeout=900)
    finally:
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag, True


# --- network and hosts -------------------------------------------------------------------------


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.231.N.0/24 that no route and no podman network of this machine uses."""
    used = run(["ip", "-4", "route"], check=False).stdout
    nets = run(["podman", "network", "ls", "--format", "{{range .Subnets}}{{.Subnet}} {{end}}"], check=False).stdout
    taken = [ipaddress.ip_network(t, strict=False) for t in re.findall(r"\d+\.\d+\.\d+\.\d+/\d+", used + " " + nets)]
    for n in random.Random(os.getpid()).sample(range(10, 250), 240):
        cand = ipaddress.ip_network(f"10.231.{n}.0/24")
        if not any(cand.overlaps(t) for t in taken):
            return cand
    raise RuntimeError("no free 10.231.N.0/24 subnet")


class Lab:
    """The containers of one run (see the module docstring); :meth:`remove` undoes it."""

    def __init__(self, work: Path, image: str) -> None:
        self.work, self.image = work, image
        self.run_id = f"td{os.getpid()}"
        self.network = f"tandem-deploy-{self.run_id}"
        self.subnet = free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.addresses = {h: str(self.subnet.network_address + o) for h, (o, _, _) in HOSTS.items()}
        self.key = work / "ssh" / "id_ed25519"
        self.containers: list[str] = []
        self.network_made = False

    def name(self, host: str) -> str:
        return f"{self.run_id}-{host}"

    @staticmethod
    def remove_stale() -> None:
        """Containers and networks of earlier runs whose process is gone (killed runs)."""
        out = run(["podman", "ps", "-a", "--filter", "label=tandem-deploy",
                   "--format", '{{.Names}} {{index .Labels "tandem-deploy"}}'], check=False).stdout
        nets = run(["podman", "network", "ls", "--filter", "label=tandem-deploy", "--format", "{{.Name}}"],
                   check=False).stdout
        for line in out.splitlines():
            name, _, rid = line.partition(" ")
            pid = rid[2:] if rid.startswith("td") else ""
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                run(["podman", "rm", "-f", "-t", "2", name], check=False, timeout=120)
        for net in nets.split():
            pid = net.rsplit("-td", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                run(["podman", "network", "rm", "-f", net], check=False)

    def start(self) -> None:
        self.remove_stale()
        self.key.parent.mkdir(mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tandem-deploy-test", "-f", str(self.key)])
        pub = self.key.with_suffix(".pub").read_text().strip()
        run(["podman", "network", "create", "--subnet", str(self.subnet), "--gateway", self.gateway,
             "--label", f"tandem-deploy={self.run_id}", self.network])
        self.network_made = True
        for host, addr in self.addresses.items():
            run([*PODMAN_RUN, "run", "-d", "--name", self.name(host), "--hostname", host,
                 "--label", f"tandem-deploy={self.run_id}", "--network", self.network, "--ip", addr,
                 *ULIMITS, "--systemd=always", self.image, "/sbin/init"])
            self.containers.append(self.name(host))
        for host in self.addresses:
            self._until(lambda h=host: run(["podman", "exec", self.name(h), "systemctl", "is-system-running"],
                                           check=False).stdout.strip() in ("running", "degraded"), 60,
                        f"systemd in {host}")
            run(["podman", "exec", self.name(host), "sh", "-c",
                 "ssh-keygen -A >/dev/null && install -d -m 700 /root/.ssh && "
                 f"echo '{pub}' > /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys && "
                 "systemctl reset-failed ssh; systemctl restart ssh"])
        for host, addr in self.addresses.items():
            self._until(lambda a=addr: run(["ssh", *self.ssh_options(), f"root@{a}", "true"], check=False,
                                           timeout=20).returncode == 0, 60, f"ssh to {host}")

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]

    @staticmethod
    def _until(check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready after {timeout:g} s")
            time.sleep(0.5)

    def journal(self, host: str, unit: str, lines: int = 30) -> str:
        return run(["podman", "exec", self.name(host), "journalctl", "-u", unit, "-n", str(lines), "--no-pager"],
                   check=False).stdout

    def remove(self) -> None:
        for c in self.containers:
            run(["podman", "rm", "-f", "-t", "2", c], check=False, timeout=120)
        if self.network_made:
            run(["podman", "network", "rm", "-f", self.network], check=False)


# --- inventory and wheelhouse -----------------------------------------------------------------


def write_inventory(lab: Lab, inv: Path, wheelhouse: Path) -> None:
    inv.mkdir(parents=True)
    groups: dict[str, dict] = {"etcd": {}, "clickhouse": {}, "prometheus": {}, "tandem_sites": {},
                               "tandem_partners": {}}
    hosts: dict[str, dict] = {}
    for host, (_, member_of, site) in HOSTS.items():
        hosts[host] = {"ansible_host": lab.addresses[host], "tandem_node_site": site}
        for g in member_of:
            groups[g][host] = None
    doc = {"all": {"hosts": hosts, "children": {
        "etcd": {"hosts": groups["etcd"]}, "clickhouse": {"hosts": groups["clickhouse"]},
        "prometheus": {"hosts": groups["prometheus"]},
        "tandem_nodes": {"children": {"tandem_sites": {"hosts": groups["tandem_sites"]},
                                      "tandem_partners": {"hosts": groups["tandem_partners"]}}}}}}
    (inv / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    gv = yaml.safe_load((EXAMPLE / "group_vars" / "all.yml").read_text())
    gv.update({
        "ansible_ssh_private_key_file": str(lab.key),
        "ansible_ssh_common_args": " ".join(lab.ssh_options()[2:]),
        "tandem_controller_cli": str(Path(sys.executable).parent / "tandem"),
        "tandem_node_wheelhouse": str(wheelhouse),
        "tandem_pki_sites_dir": str(EXAMPLE / "files" / "sites"),
        "tandem_node_sites_dir": str(EXAMPLE / "files" / "sites"),
        "clickhouse_controller_networks": [lab.gateway],
        # the hosts share this machine's two cores: a looser etcd lease than the default 3 s
        "tandem_node_etcd_ttl": 5,
    })
    (inv / "group_vars").mkdir()
    (inv / "group_vars" / "all.yml").write_text(yaml.safe_dump(gv, sort_keys=False))


def build_wheelhouse(wheelhouse: Path, work: Path) -> Path:
    """The project's wheel and its dependencies' wheels in ``wheelhouse``, and a copy of
    the project's wheel repacked as :data:`UPGRADE_VERSION` (returned, not in it yet)."""
    wheelhouse.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse), str(ROOT)], timeout=900)
    (own,) = wheelhouse.glob("tandem_router-*.whl")
    run([*pip, "wheel", "-w", str(wheelhouse), str(own)], timeout=900)
    # The upgrade: the same code under a new version (dist-info renamed, RECORD rewritten).
    unpacked = work / "unpacked"
    run([sys.executable, "-m", "wheel", "unpack", "-d", str(unpacked), str(own)])
    (tree,) = unpacked.iterdir()
    (info,) = tree.glob("*.dist-info")
    old_version = info.name[len("tandem_router-"):-len(".dist-info")]
    meta = info / "METADATA"
    meta.write_text(meta.read_text().replace(f"\nVersion: {old_version}\n", f"\nVersion: {UPGRADE_VERSION}\n", 1))
    info.rename(info.with_name(f"tandem_router-{UPGRADE_VERSION}.dist-info"))
    out = work / "upgrade"
    out.mkdir()
    run([sys.executable, "-m", "wheel", "pack", "-d", str(out), str(tree)])
    (new,) = out.glob("*.whl")
    return new


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1",
               PATH=f"{DEPLOY_VENV / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1", LC_ALL="C.UTF-8", LANG="C.UTF-8")  # ansible-core wants UTF-8
    return env


def recap(output: str) -> dict[str, dict[str, int]]:
    return {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
            for m in RECAP.finditer(output)}


async def playbook(inv: Path, name: str, work: Path, *extra: str) -> dict[str, dict[str, int]]:
    """``ansible-playbook`` as a child process (the traffic of this process goes on);
    its output in ``work/NAME.log``; the recap per host. RuntimeError when it fails."""
    log_path = work / f"{Path(name).stem}.log"
    with open(log_path, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(DEPLOY_VENV / "bin" / "ansible-playbook"), "-i", str(inv), name, *extra, cwd=ANSIBLE_DIR,
            env=ansible_env(), stdout=out, stderr=subprocess.STDOUT)
        rc = await proc.wait()
    text = log_path.read_text(errors="replace")
    r = recap(text[text.rfind("PLAY RECAP"):])
    if rc != 0 or not r:
        raise RuntimeError(f"ansible-playbook {name} exited {rc}; end of {log_path}:\n{text[-6000:]}")
    return r


# --- smoke and upgrade -------------------------------------------------------------------------


def ctl(inv: Path, *args: str) -> subprocess.CompletedProcess:
    return run([str(Path(sys.executable).parent / "tandem"), "ctl", "--context", str(inv / "tandem.yaml"), *args],
               check=False, timeout=60)


def context_sites(inv: Path) -> tuple[dict[str, str], Path]:
    doc = yaml.safe_load((inv / "tandem.yaml").read_text())
    ctx = doc["contexts"][doc["current-context"]]
    return dict(ctx["sites"]), Path(ctx["tls-dir"])


async def gather_node_calls(addresses: dict[str, str], tls: Path, run_id: str) -> dict[str, list]:
    from router.sim.rpc import NodeClient

    out = {}
    for site, addr in addresses.items():
        client = NodeClient(site, addr, tls)
        try:
            await client.wait_ready(30.0)
            calls = await client.list_calls(timeout=15.0)
            out[site] = [c for c in calls if c.call_id.startswith(run_id + "-")]
        finally:
            await client.close()
    return out


async def smoke(inv: Path) -> dict:
    """Every site serving and a member; a call at toronto (no agent signed in there)
    answered at lyon, on another host."""
    from router.config import load_sites
    from router.sim.loadgen import CallStream, LoadGen, LoadGenConfig
    from router.sim.report import reconcile

    r = ctl(inv, "get", "sites", "-o", "json")
    if r.returncode != 0:
        raise RuntimeError(f"tandem ctl get sites exited {r.returncode}: {r.stderr[-2000:]}")
    rows = json.loads(r.stdout)
    not_ok = [row for row in rows if not (row.get("serving") and row.get("member"))]
    if not_ok or len(rows) != len(HOSTS):
        raise RuntimeError(f"not every site serves as a member: {rows}")
    addresses, tls = context_sites(inv)
    sites = {s.site.name: s for s in load_sites(EXAMPLE / "files" / "sites")}
    lyon_agents = [aid for aid, g in sites["lyon"].agent_profiles().items()
                   if "billing" in g.skills and "en" in g.languages][:2]
    cfg = LoadGenConfig(
        addresses={"toronto": addresses["toronto"], "lyon": addresses["lyon"]},
        streams=[CallStream(site="toronto", skill="billing", rate_per_h=3600.0, talk_s=1.0, language="en",
                            name="billing-en-voice", patience_s=None)],
        agents={"lyon": lyon_agents}, time_scale=1.0, seed=7, run_id=f"smoke{os.getpid()}", max_calls=3,
        tls_dir=tls, drain_s=30.0)
    gen = LoadGen(cfg)
    await gen.run(2.0)
    node_calls = await gather_node_calls(cfg.addresses, tls, gen.run_id)
    rec = reconcile(gen.records.values(), node_calls, gen.ledger, gen.run_id)
    from router.v1 import types_pb2

    answered_at_lyon = sum(1 for c in node_calls["lyon"] if c.state == types_pb2.CALL_STATE_COMPLETED)
    return {"smoke_offered": rec.offered, "smoke_overflowed": answered_at_lyon, "smoke_lost": rec.lost,
            "smoke_duplicates": rec.duplicates, "smoke_examples": rec.examples[:5],
            "sites": {row["name"]: bool(row.get("serving")) for row in rows}}


async def upgrade_under_traffic(inv: Path, work: Path) -> dict:
    from router.config import load_sites
    from router.sim.demo import BEHAVIOUR
    from router.sim.loadgen import CallStream, LoadGen, LoadGenConfig
    from router.sim.report import reconcile

    addresses, tls = context_sites(inv)
    sites = [s for s in load_sites(EXAMPLE / "files" / "sites") if s.site.name in addresses]
    scale = 10.0  # talk and patience x1/10; the nodes' wrap-ups stay real time
    streams = [CallStream(site=s.site.name, skill=q.skill, rate_per_h=45.0, talk_s=90.0, language=q.language or "",
                          name=q.name, patience_s=900.0)
               for s in sites if s.site.kind == "inhouse" for q in s.queues
               if q.channel.value == "voice" and q.skill in ("billing", "support", "sales")]
    cfg = LoadGenConfig(
        addresses=addresses, streams=streams, tls_dir=tls, time_scale=scale, behaviour=BEHAVIOUR, seed=11,
        agents={s.site.name: list(s.agent_profiles()) for s in sites},
        capacity={aid: {ch.value: n for ch, n in g.capacity.items()}
                  for s in sites for aid, g in s.agent_profiles().items()},
        run_id=f"upg{os.getpid()}", drain_s=60.0, max_calls=20_000)
    gen = LoadGen(cfg)
    traffic = asyncio.create_task(gen.run(3600.0))
    deadline = time.monotonic() + 120
    while not gen.started_at:
        if traffic.done():
            await traffic
            raise RuntimeError(f"the traffic did not start: {gen.errors[:5]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the traffic's agents were not in after 120 s")
        await asyncio.sleep(0.2)
    await asyncio.sleep(6.0)  # calls in queues and in talk before the first drain
    t0 = time.monotonic()
    try:
        changed = await playbook(inv, "rolling-upgrade.yml", work, "-e", f"tandem_node_version={UPGRADE_VERSION}")
    finally:
        upgrade_s = time.monotonic() - t0
        await asyncio.sleep(5.0)
        gen.stop_arrivals.set()
        await traffic
    node_calls = await gather_node_calls(addresses, tls, gen.run_id)
    rec = reconcile(gen.records.values(), node_calls, gen.ledger, gen.run_id)
    refused = sum(1 for r in gen.records.values() if r.outcome == "offer_failed")
    return {"upgrade_calls": rec.offered, "upgrade_lost": rec.lost, "upgrade_duplicates": rec.duplicates,
            "upgrade_refused": refused, "upgrade_transferred": rec.transferred, "upgrade_s": round(upgrade_s, 1),
            "upgrade_changed": sum(h["changed"] for h in changed.values()),
            "upgrade_examples": rec.examples[:5] + gen.errors[:5]}


def versions(lab: Lab) -> dict[str, str]:
    out = {}
    for host in HOSTS:
        p = run(["podman", "exec", lab.name(host), "/opt/tandem/venv/bin/python", "-c",
                 "import importlib.metadata as m; print(m.version('tandem-router'))"], check=False)
        out[host] = p.stdout.strip() or p.stderr.strip()[-200:]
    return out


def failed_stops(lab: Lab) -> dict[str, int]:
    """How many times systemd marked each host's node unit failed (a stop that ran into
    its timeout, a crash): a node leaves no process behind when it stops, so none."""
    out = {}
    for host in HOSTS:
        p = run(["podman", "exec", lab.name(host), "journalctl", "-u", "tandem-node", "--no-pager", "-o", "cat"],
                check=False)
        out[host] = p.stdout.count("tandem-node.service: Failed with result")
    return out


# --- the whole run -----------------------------------------------------------------------------


async def deploy(work: Path, keep: bool) -> dict:
    t_start = time.monotonic()
    phases: dict[str, float] = {}
    t = time.monotonic()
    image, built = ensure_image(work)
    phases["image_s"] = round(time.monotonic() - t, 1)
    lab = Lab(work, image)
    try:
        t = time.monotonic()
        lab.start()
        phases["hosts_s"] = round(time.monotonic() - t, 1)
        log(f"{len(HOSTS)} hosts up on {lab.subnet} ({lab.network})")
        t = time.monotonic()
        upgrade_wheel = build_wheelhouse(work / "wheelhouse", work)
        phases["wheelhouse_s"] = round(time.monotonic() - t, 1)
        inv = work / "inventory"
        write_inventory(lab, inv, work / "wheelhouse")
        t = time.monotonic()
        first = await playbook(inv, "site.yml", work)
        phases["first_run_s"] = round(time.monotonic() - t, 1)
        log(f"first run: {first}")
        t = time.monotonic()
        second = await playbook(inv, "site.yml", work)
        phases["second_run_s"] = round(time.monotonic() - t, 1)
        log(f"second run: {second}")
        t = time.monotonic()
        s = await smoke(inv)
        phases["smoke_s"] = round(time.monotonic() - t, 1)
        log(f"smoke: {s}")
        shutil.copy(upgrade_wheel, work / "wheelhouse" / upgrade_wheel.name)
        u = await upgrade_under_traffic(inv, work)
        log(f"upgrade: {u}")
        v = versions(lab)
        failed = failed_stops(lab)
        return {
            "hosts": len(HOSTS),
            "first_run_changed": sum(h["changed"] for h in first.values()),
            "second_run_changed": sum(h["changed"] for h in second.values()),
            "smoke_overflowed": s["smoke_overflowed"],
            "upgrade_calls": u["upgrade_calls"], "upgrade_lost": u["upgrade_lost"],
            "upgrade_duplicates": u["upgrade_duplicates"],
            "seconds": round(time.monotonic() - t_start, 1),
            "upgraded_version": sorted(set(v.values())), "upgrade_refused": u["upgrade_refused"],
            "upgrade_transferred": u["upgrade_transferred"], "upgrade_s": u["upgrade_s"],
            "second_run_by_host": {h: r["changed"] for h, r in second.items()},
            "node_unit_failures": sum(failed.values()), "node_unit_failures_by_host": failed,
            "smoke": s, "upgrade_examples": u["upgrade_examples"], "image_built": built, **phases,
        }
    except BaseException:
        for host in HOSTS:
            log(f"--- {host} tandem-node:\n{lab.journal(host, 'tandem-node', 15)}")
        raise
    finally:
        if keep:
            log(f"kept: containers {', '.join(lab.containers)}, network {lab.network}, {work}")
        else:
            lab.remove()


def ok(result: dict) -> bool:
    return (result["first_run_changed"] > 0 and result["second_run_changed"] == 0 and result["smoke_overflowed"] >= 1
            and result["upgrade_calls"] > 0 and result["upgrade_lost"] == 0 and result["upgrade_duplicates"] == 0
            and result["upgraded_version"] == [UPGRADE_VERSION] and result["node_unit_failures"] == 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Deploy the cluster with the Ansible roles onto containers; check it.")
    ap.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    ap.add_argument("--keep", action="store_true", help="leave the containers, network and files")
    ap.add_argument("--image-only", action="store_true", help="only build the base image when missing, then exit")
    a = ap.parse_args(argv)
    for tool in ("podman", "runc", "debootstrap", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (make deploy-deps installs it)", file=sys.stderr)
            return 2
    if not (DEPLOY_VENV / "bin" / "ansible-playbook").exists():
        print(f"error: no {DEPLOY_VENV}/bin/ansible-playbook (make deploy-deps)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tandem-deploy-", dir="/var/tmp"))
    if a.image_only:
        try:
            tag, built = ensure_image(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps({"image": tag, "built": built}))
        return 0
    try:
        result = asyncio.run(deploy(work, a.keep))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    line = json.dumps({k: result[k] for k in ("hosts", "first_run_changed", "second_run_changed", "smoke_overflowed",
                                               "upgrade_calls", "upgrade_lost", "upgrade_duplicates",
                                               "node_unit_failures", "seconds")})
    if not a.json:
        print(json.dumps(result, indent=1, default=str), file=sys.stderr)
    else:
        print(json.dumps({k: v for k, v in result.items() if k not in json.loads(line)}, default=str),
              file=sys.stderr)
    print(line, flush=True)
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
