"""An embedded gproxy's life is its host's: it ends with the host however the host
ends, and a fork() of the host neither duplicates nor breaks it.

Each test runs ``embed_host.py`` (a host program driven over stdin) and looks at
processes and listening sockets from the outside, in /proc.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import free_port, wait_until
from tests.integration.embedding import gone, listener_holders, relays
from tests.integration.helpers import Paho

pytestmark = pytest.mark.integration
PROGRAM = os.path.join(os.path.dirname(__file__), "embed_host.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Host:
    """``embed_host.py`` as a child of the test, stopped by PID at the end."""

    def __init__(self, tmp_path, broker, mode, *extra):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, PROGRAM, mode, str(broker.port), str(self.port),
             str(tmp_path / "apisix.yaml")] + list(extra), cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, start_new_session=True)
        self.buf = b""
        self.ready = self.read()
        self.child = self.ready["child"]
        self.others = []  # processes the host started that a test must not leave behind

    def send(self, command):
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout=60):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError("no answer from the host within %ss" % timeout)
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError("the host exited: %s" % self.proc.wait(5))
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, command):
        self.send(command)
        return self.read()

    def close(self):
        for pid in self.others:
            _kill(pid)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.child:
            assert wait_until(lambda: gone(self.child), 20), "gproxy outlived the test's host"


@pytest.fixture
def host(mosquitto, tmp_path):
    made = []

    def make(mode="process", *extra):
        made.append(Host(tmp_path, mosquitto(), mode, *extra))
        return made[-1]
    yield make
    for h in made:
        h.close()


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


# -- process mode: the child ends with its host ------------------------------------

@pytest.mark.parametrize("how", ["SIGKILL", "exit without stop", "os._exit"])
def test_the_child_ends_with_its_host(host, how):
    h = host("process")
    assert not gone(h.child) and listener_holders(h.port) == {h.child}
    if how == "SIGKILL":
        h.proc.kill()
    else:
        h.send("exit" if how == "exit without stop" else "_exit")
    h.proc.wait(30)
    assert wait_until(lambda: gone(h.child), 20), "gproxy outlived its host"
    assert listener_holders(h.port) == set()


def test_the_death_signal_ends_the_child_when_a_grandchild_holds_the_channel(host):
    """A process the host started holds a copy of the host's end of the channel, so
    the child sees no EOF when the host dies: PR_SET_PDEATHSIG still ends it."""
    h = host("process")
    grandchild = h.ask("grandchild")["grandchild"]
    h.others.append(grandchild)
    h.proc.kill()
    h.proc.wait(10)
    assert wait_until(lambda: gone(h.child), 20), "gproxy outlived its host"
    assert not gone(grandchild)  # the channel was still open: the signal did it


def test_a_proxy_started_from_a_thread_outlives_that_thread(host):
    """The death signal follows the thread that forked the child: the handle forks
    from its own long-lived thread, not from the caller's."""
    h = host("process", "--from-thread")
    time.sleep(1.0)
    assert h.ask("stats") == {"stats": 0}
    assert not gone(h.child)
    assert relays(h.port, "thread-started")


def test_a_killed_child_is_reported_and_stop_still_returns(host):
    h = host("process")
    os.kill(h.child, signal.SIGKILL)
    assert wait_until(lambda: h.ask("stats") == {"stats": "ProxyStopped"}, 10)
    assert h.ask("stop") == {"stopped": True}
    assert gone(h.child) and not os.path.exists("/proc/%d" % h.child)  # reaped


def test_sigterm_to_the_child_drains_it_and_the_handle_says_so(host):
    """systemd stopping every process of a service, say: the child drains and exits as
    the gproxy command does; the host's calls then raise, and its stop returns."""
    h = host("process")
    with Paho("live", h.port) as live:
        os.kill(h.child, signal.SIGTERM)
        assert live.disconnected.wait(15)  # the drain ends the session
    assert wait_until(lambda: h.ask("stats") == {"stats": "ProxyStopped"}, 15)
    assert h.ask("stop") == {"stopped": True}
    assert gone(h.child) and listener_holders(h.port) == set()


# -- fork() by the host, in both modes ---------------------------------------------

@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_forked_child_neither_uses_nor_holds_the_proxy(host, mode):
    h = host(mode)
    owner = h.child if mode == "process" else h.proc.pid
    forked = h.ask("fork")
    h.others.append(forked["forked"])
    # the inherited handle refuses calls and its stop does nothing
    assert forked["call"] == "ProxyStopped" and forked["stop"] is None
    # the forked child, alive, holds none of the proxy's sockets
    assert listener_holders(h.port) == {owner}
    assert relays(h.port, "after-fork")
    with Paho("live", h.port) as live:
        assert h.ask("stop") == {"stopped": True}
        # the proxy's end of the session reached the client although the forked
        # child, still alive, inherited the session's sockets (thread mode)
        assert live.disconnected.wait(10), "the session's end never reached the client"
    assert listener_holders(h.port) == set()
    assert not gone(forked["forked"])


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_forked_children_exiting_do_not_break_the_proxy(host, mode):
    h = host(mode)
    for _ in range(3):
        assert h.ask("fork-exit") == {"forked_exit": 0}
    assert h.ask("stats") == {"stats": 0}
    assert relays(h.port, "after-exits")
    if mode == "process":
        assert not gone(h.child)
