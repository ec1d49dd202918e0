"""gproxy embedded in the servers and programs people run, each for real: a Flask app
under gunicorn with sync workers, a Django project (runserver with its autoreloader,
and a management command), and a script with multiprocessing workers.

Each one relays paho traffic through the embedded proxy, stops with its server,
and leaves no process and no listening port behind (checked in /proc).  The
host programs and their hooks live in ``hosts/`` and are what docs/embedding.md
shows.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.conftest import HOST, free_port, wait_until
from tests.integration.embedding import (ADMIN_KEY, descendants, embedded_below, gone,
                                         is_gproxy_child, listener_holders, parent_of,
                                         relays, write_conf)
from tests.integration.helpers import Paho

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOSTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hosts")
MODES = pytest.mark.parametrize("mode", ["process", "thread"])


class Server:
    """A server process tree the test starts (its own session) and ends by PID."""

    def __init__(self, argv, tmp_path, cwd=HOSTS, **env):
        self.log = tmp_path / "server.log"
        env = dict(os.environ, PYTHONPATH=ROOT, **env)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        self.tree = []

    def text(self):
        return self.log.read_text(errors="replace")[-6000:]

    def get(self, port, path, timeout=60):
        """The JSON answer of ``GET path``, retried until the server answers."""
        def attempt():
            try:
                with urllib.request.urlopen("http://%s:%d%s" % (HOST, port, path),
                                            timeout=10) as resp:
                    return json.load(resp)
            except OSError:
                assert self.proc.poll() is None, "the server exited:\n" + self.text()
                return None
        answer = wait_until(attempt, timeout, interval=0.2)
        assert answer, "no answer from %s:\n%s" % (path, self.text())
        return answer

    def remember_tree(self):
        self.tree = sorted(set(self.tree) | set(descendants(self.pid)))

    def end(self, sig, timeout=60, group=False):
        """Send ``sig`` to the server's main process (or its process group, as a
        terminal's Ctrl-C does); its exit status."""
        self.remember_tree()
        (os.killpg if group else os.kill)(self.pid, sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        for pid in [self.pid] + self.tree:  # only processes this test started
            if not gone(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc.wait(10)


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.kill()


def nothing_left(server, *ports):
    assert wait_until(lambda: all(gone(p) for p in server.tree), 20), \
        "left behind: %s\n%s" % ([p for p in server.tree if not gone(p)], server.text())
    for port in ports:
        assert listener_holders(port) == set(), port


def start_gunicorn(tmp_path, broker, mode, servers):
    conf, port, admin_port = write_conf(tmp_path, broker.port)
    http_port = free_port()
    server = Server([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                     "--bind", "%s:%d" % (HOST, http_port), "flask_app:app"], tmp_path,
                    GPROXY_CONFIG=conf, GPROXY_MODE=mode,
                    GPROXY_ADMIN="%s:%d" % (HOST, admin_port), GPROXY_ADMIN_KEY=ADMIN_KEY)
    servers.append(server)
    return server, port, admin_port, http_port


def gunicorn_workers(server):
    """The master's worker processes (not its embedded gproxy)."""
    return {pid for pid in descendants(server.pid) if parent_of(pid) == server.pid
            and not is_gproxy_child(pid)}


@MODES
def test_gunicorn_runs_one_proxy_for_the_whole_server(mosquitto, tmp_path, mode, servers):
    broker = mosquitto()
    server, port, admin_port, http_port = start_gunicorn(tmp_path, broker, mode, servers)
    answer = server.get(http_port, "/proxy")
    # the first request may be answered before the master has forked its second worker
    assert wait_until(lambda: len(gunicorn_workers(server)) == 2, 30), server.text()
    workers = gunicorn_workers(server)
    assert answer["worker"] in workers, server.text()
    assert relays(port, "gunicorn")
    # one proxy, the master's: a child of the master, or a thread in it; the workers
    # forked from the master hold none of its sockets
    proxies = embedded_below(server.pid)
    owner = proxies[0] if mode == "process" else server.pid
    assert len(proxies) == (1 if mode == "process" else 0), proxies
    assert listener_holders(port) == {owner}
    # SIGHUP: gunicorn re-reads its config and replaces its workers; the proxy stays
    os.kill(server.pid, signal.SIGHUP)
    assert wait_until(lambda: len(gunicorn_workers(server)) == 2 and
                      not gunicorn_workers(server) & workers, 60), server.text()
    assert embedded_below(server.pid) == proxies
    assert relays(port, "after-hup")
    assert listener_holders(port) == {owner}
    # SIGTERM stops the server, and the proxy with it: its session ends, nothing stays
    with Paho("live", port) as live:
        assert server.get(http_port, "/proxy")["live_sessions"] == 1
        assert server.end(signal.SIGTERM) == 0, server.text()
        assert live.disconnected.wait(10)
    nothing_left(server, port, admin_port, http_port)


def test_gunicorn_does_not_start_without_its_proxy(mosquitto, tmp_path, servers):
    """A proxy that cannot start (its port taken) stops gunicorn, with the reason."""
    broker = mosquitto()
    conf, port, admin_port = write_conf(tmp_path, broker.port)
    taken = socket.create_server((HOST, port))
    try:
        server = Server([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                         "--bind", "%s:%d" % (HOST, free_port()), "flask_app:app"], tmp_path,
                        GPROXY_CONFIG=conf)
        servers.append(server)
        assert server.proc.wait(60) != 0
    finally:
        taken.close()
    assert "cannot listen on %s:%d" % (HOST, port) in server.text()
    assert "Booting worker" not in server.text()
    server.remember_tree()
    nothing_left(server, admin_port)


# -- Django ---------------------------------------------------------------------

DJANGO = os.path.join(HOSTS, "djangosite")


def django_env(conf, mode):
    return {"GPROXY_CONFIG": conf, "GPROXY_MODE": mode,
            "DJANGO_SETTINGS_MODULE": "site_settings"}


@MODES
def test_django_runserver_with_its_autoreloader_starts_one_proxy(mosquitto, tmp_path, mode,
                                                                 servers):
    """AppConfig.ready runs in the autoreloader's watcher and in the process it serves
    from: only the latter starts the proxy.  A code change restarts that process:
    its proxy stops as it exits and the new one starts its own, still only one."""
    broker = mosquitto()
    conf, port, _ = write_conf(tmp_path, broker.port, admin=False)
    http_port = free_port()
    server = Server([sys.executable, "manage.py", "runserver", "%s:%d" % (HOST, http_port)],
                    tmp_path, cwd=DJANGO, **django_env(conf, mode))
    servers.append(server)
    first = server.get(http_port, "/proxy/")
    assert first["server"] != server.pid  # the autoreloader serves from a child
    assert relays(port, "django")
    expected = 1 if mode == "process" else 0
    assert len(embedded_below(server.pid)) == expected
    assert listener_holders(port) == {first["proxy_pid"] or first["server"]}
    server.remember_tree()
    os.utime(os.path.join(DJANGO, "relayapp", "views.py"))  # a code change: reload
    second = wait_until(lambda: (lambda a: a if a["server"] != first["server"] else None)(
        server.get(http_port, "/proxy/")), 60)
    assert second, server.text()
    assert len(embedded_below(server.pid)) == expected
    assert first["proxy_pid"] is None or gone(first["proxy_pid"])
    assert relays(port, "django-reloaded")
    server.end(signal.SIGINT, group=True)  # Ctrl-C in runserver's terminal
    nothing_left(server, port, http_port)


@MODES
def test_a_django_management_command_serves_until_sigterm(mosquitto, tmp_path, mode, servers):
    broker = mosquitto()
    conf, port, admin_port = write_conf(tmp_path, broker.port)
    server = Server([sys.executable, "manage.py", "gproxy_serve"], tmp_path, cwd=DJANGO,
                    **django_env(conf, mode))
    servers.append(server)
    assert wait_until(lambda: listener_holders(port), 60), server.text()
    assert relays(port, "command")
    with Paho("live", port) as live:
        assert server.end(signal.SIGTERM) == 0, server.text()
        assert live.disconnected.wait(10)
    assert "gproxy stopped" in server.text()
    nothing_left(server, port, admin_port)


# -- a script with worker processes ------------------------------------------------

@MODES
@pytest.mark.parametrize("pool", ["concurrent.futures fork", "multiprocessing spawn"])
def test_a_script_with_worker_processes(mosquitto, tmp_path, mode, pool, servers):
    broker = mosquitto()
    conf, port, _ = write_conf(tmp_path, broker.port, admin=False)
    server = Server([sys.executable, os.path.join(HOSTS, "pool_program.py"), conf, mode,
                     pool.split()[1]], tmp_path, cwd=str(tmp_path))
    servers.append(server)
    assert server.proc.wait(120) == 0, server.text()
    report = json.loads(server.text().strip().splitlines()[-1])
    # every worker relayed through the one proxy; a forked one could not use the handle
    assert sorted(report["relayed"]) == ["w0", "w1", "w2", "w3"]
    assert set(report["handles"]) == ({"ProxyStopped"} if pool.endswith("fork") else {None})
    assert report["proxies_during"] == (1 if mode == "process" else 0)
    assert report["after_workers"] is True  # the workers' exits broke nothing
    assert report["left"] == []
    nothing_left(server, port)
