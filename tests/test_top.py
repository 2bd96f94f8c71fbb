"""``tandem top`` on a real terminal: run in a tmux session against ``tandem up --traffic``
(see tests/test_ctl.py), the screen read with ``tmux capture-pane -p``: the header with the
cluster's totals, every site and its queues with their figures, the alerts footer, and
figures that change from one refresh to the next (at least every second). Also: the
screen rendered without a terminal, and ``q`` quits."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
import uuid

import pytest

from test_ctl import SITES, TANDEM, with_supervisor

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

QUEUES = {"lyon": ["billing-fr-voice", "support-fr-voice", "sales-voice"],
          "montreal": ["billing-en-voice", "support-en-voice"], "callpro": ["billing-en-voice"]}


@pytest.fixture(scope="module")
def cluster(tandem_cluster, tmp_path_factory):
    return with_supervisor(tandem_cluster.data_dir, tmp_path_factory.mktemp("top"))


class Tmux:
    def __init__(self, command: str, width: int = 170, height: int = 60) -> None:
        self.name = f"tandem-top-{uuid.uuid4().hex[:8]}"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        command], check=True, timeout=30)
        # another tmux client or server default may have set a size: ours is the one we asked
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", str(width), "-y", str(height)],
                       capture_output=True, timeout=30)

    def screen(self) -> str:
        r = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                           timeout=30)
        return r.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True, timeout=30)

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True, timeout=30)


def wait_screen(tm: Tmux, pred, timeout: float, what: str) -> str:
    end = time.monotonic() + timeout
    s = ""
    while time.monotonic() < end:
        s = tm.screen()
        if pred(s):
            return s
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; screen:\n{s}")


def refresh_no(screen: str) -> int:
    m = re.search(r"refresh #(\d+)", screen)
    return int(m.group(1)) if m else 0


def body(screen: str) -> list[str]:
    """The site and queue rows (the figures), without the header's clock."""
    out = []
    for line in screen.splitlines():
        words = line.split()
        if words and (words[0] in SITES or any(words[0] in qs for qs in QUEUES.values())):
            out.append(line.rstrip())
    return out


def test_top_in_tmux(cluster, tmp_path):
    done = tmp_path / "exit-code"
    cmd = (f"unset COLUMNS LINES; NO_COLOR=1 {shlex.quote(TANDEM)} top --context {shlex.quote(str(cluster.context))} "
           f"--iterations 600; echo $? > {shlex.quote(str(done))}; sleep 60")
    tm = Tmux(cmd)
    try:
        first = wait_screen(tm, lambda s: all(site in s for site in SITES) and refresh_no(s) >= 1, 90,
                            "the first screen")
        assert "tandem top" in first and "alerts firing" in first and "SL" in first
        for header in ("WAIT", "OLDEST", "EWT", "SL/TGT", "AVAIL", "ON", "ACW", "NRDY", "OVF-IN", "OVF-OUT",
                       "ALERTS"):
            assert header in first, header
        rows = body(first)
        for site, queues in QUEUES.items():
            assert any(r.split()[0] == site for r in rows), site
            for q in queues:
                assert any(r.split()[0] == q for r in rows), q
        assert any(re.search(r"\d+%/\d+", r) for r in rows), rows  # SL against its target
        assert "alerts" in first  # the footer
        # refreshed at least every second, and the traffic moves the figures
        n0, t0 = refresh_no(first), time.monotonic()
        later = wait_screen(tm, lambda s: refresh_no(s) >= n0 + 3, 30, "three more refreshes")
        assert (time.monotonic() - t0) / max(refresh_no(later) - n0, 1) < 2.5  # ~1 s each on a loaded box
        wait_screen(tm, lambda s: body(s) and body(s) != rows, 60, "the figures to change")
        tm.keys("q")
        wait_screen(tm, lambda s: done.exists(), 30, "top to quit on q")
        assert done.read_text().strip() == "0"
    finally:
        tm.kill()
    assert not tm.alive()


def test_top_render_without_terminal(cluster):
    """``--iterations`` stops it; off a terminal the last screen is printed when it stops."""
    r = subprocess.run([TANDEM, "top", "--context", str(cluster.context), "--iterations", "2", "--interval", "0.5"],
                       capture_output=True, text=True, timeout=120, env={"NO_COLOR": "1", "COLUMNS": "170",
                                                                         "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    for site in SITES:
        assert site in r.stdout
    assert "billing-fr-voice" in r.stdout


def test_top_without_context_exits_64(tmp_path):
    r = subprocess.run([TANDEM, "top", "--context", str(tmp_path / "none.yaml"), "--iterations", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 64 and "none.yaml" in r.stderr
