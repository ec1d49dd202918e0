"""A plain threaded program that embeds gproxy (run by test_embedded.py as a child).

    python embedded_program.py BROKER_PORT STORE_DIR {admin|no-admin} {process|thread}

Its own threads do blocking I/O the whole time (urllib against a local
http.server, time.sleep, a blocking socket echo server and its client) while
paho clients relay through the embedded proxy to the broker.  It prints one
JSON report on stdout; the test checks it.  Nothing here is monkey-patched.
"""

import gc
import http.server
import json
import os
import socket
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.integration.helpers import Paho  # noqa: E402

HOST = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stdlib_state():
    import select
    return [repr(x) for x in (socket.socket, threading.Thread, threading.Lock, time.sleep,
                              select.select)]


def thread_names():
    """The program's threads, less http.server's short-lived per-request ones."""
    return sorted(t.name for t in threading.enumerate()
                  if "process_request_thread" not in t.name)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def socket_inodes(pid="self"):
    """The inodes of the sockets process ``pid`` holds."""
    found = set()
    for fd in os.listdir("/proc/%s/fd" % pid):
        try:
            target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def process_gone(pid):
    """True once ``pid`` is neither running nor a zombie waiting to be reaped."""
    return pid is None or not os.path.exists("/proc/%d" % pid)


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Background:
    """The host program's own blocking work, counted per kind."""

    def __init__(self):
        self.stop = threading.Event()
        self.gate = threading.Event()  # cleared: the loops park between steps
        self.gate.set()
        self.busy = 0
        self.lock = threading.Lock()
        self.counts = {"urllib": 0, "sleep": 0, "echo": 0}
        self.errors = []
        self.http = http.server.ThreadingHTTPServer((HOST, 0), Quiet)
        self.echo = socket.create_server((HOST, 0))
        # Inheritable, as gunicorn's listeners and systemd's passed sockets are: the
        # proxy's child process must still not get it.
        os.set_inheritable(self.echo.fileno(), True)
        self.threads = [threading.Thread(target=f, daemon=True) for f in (
            self.http.serve_forever, self._echo_server, self._urllib, self._sleep, self._echo)]

    def start(self):
        for t in self.threads:
            t.start()

    def _loop(self, kind, step):
        while not self.stop.is_set():
            self.gate.wait()
            with self.lock:
                if self.stop.is_set():
                    return
                self.busy += 1
            try:
                step()
                self.counts[kind] += 1
            except Exception as exc:  # reported, not raised: the test looks at it
                self.errors.append("%s: %r" % (kind, exc))
                return
            finally:
                with self.lock:
                    self.busy -= 1

    def quiet_fd_count(self):
        """Descriptors open while the loops are parked (their sockets come and go)."""
        gc.collect()  # paho clients keep a socketpair until they are collected
        self.gate.clear()
        deadline = time.monotonic() + 10
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        count = fd_count()
        self.gate.set()
        return count

    def _urllib(self):
        url = "http://%s:%d/" % self.http.server_address[:2]
        self._loop("urllib", lambda: urllib.request.urlopen(url, timeout=5).read())

    def _sleep(self):
        self._loop("sleep", lambda: time.sleep(0.01))

    def _echo_server(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.echo.accept()
            except OSError:
                return
            with conn:
                conn.sendall(conn.recv(64))

    def _echo(self):
        def step():
            with socket.create_connection(self.echo.getsockname(), timeout=5) as c:
                c.sendall(b"ping")
                assert c.recv(64) == b"ping"
        self._loop("echo", step)

    def finish(self):
        self.gate.clear()
        with self.lock:
            self.stop.set()  # a loop now leaves at its next step
        deadline = time.monotonic() + 10
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        self.gate.set()
        self.http.shutdown()
        self.echo.close()
        for t in self.threads:
            t.join(10)
        self.http.server_close()


def relay(port, tag):
    """A subscriber and a publisher through the proxy; the message must arrive."""
    with Paho("sub-" + tag, port) as sub, Paho("pub-" + tag, port) as pub:
        sub.subscribe("t/" + tag, qos=1)
        pub.publish("t/" + tag, b"hello " + tag.encode(), qos=1)
        return sub.expect_message().payload.decode()


def main(broker_port, store_dir, mode, embed_mode):
    report = {"before_import": stdlib_state()}
    import gproxy
    report["after_import"] = stdlib_state()
    background = Background()
    background.start()
    time.sleep(0.2)  # the host's threads are already busy before gproxy starts
    fds_before, threads_before = background.quiet_fd_count(), thread_names()
    port, admin_port = free_port(), free_port()
    conf = {"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]}},
            "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": admin_port}}},
            "gproxy": {"store": {"path": os.path.join(store_dir, "apisix.yaml")}}}
    if mode == "no-admin":
        conf["deployment"]["admin"] = False
    counts_at_start = dict(background.counts)
    proxy = gproxy.start(conf, mode=embed_mode)
    report["after_start"] = stdlib_state()
    report["mode"] = proxy.mode
    child = getattr(proxy, "pid", None)
    report["child_pid"] = child
    if child is not None:  # none of the host's sockets (its listeners) went to the child
        report["shared_sockets"] = sorted(socket_inodes() & socket_inodes(child))
    report["addresses"] = proxy.addresses
    report["admin_address"] = proxy.admin_address
    report["admin_listening"] = _listening(admin_port)
    report["put"] = proxy.routes.put("1", {
        "plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}},
        "upstream": {"type": "chash", "key": "mqtt_client_id",
                     "nodes": [{"host": HOST, "port": broker_port, "weight": 1}]}})
    try:
        proxy.routes.put("2", {"upstream": {"type": "roundrobin", "nodes": {}}, "bogus": 1})
    except gproxy.AdminError as exc:
        report["refused"] = [exc.status, exc.error_msg]
    report["get_missing"] = _error(lambda: proxy.upstreams.get("nope"))
    report["messages"] = _from_threads(proxy.port)
    with Paho("live-1", proxy.port):
        report["sessions"] = proxy.sessions()
        report["stats"] = proxy.stats()
    report["list"] = proxy.routes.list()
    report["threads_running"] = thread_names()
    proxy.stop(grace=2)
    report["after_stop_call"] = _error(lambda: proxy.sessions())
    report["child_gone"] = process_gone(child)
    report["host_counts_during"] = {k: background.counts[k] - counts_at_start[k]
                                    for k in background.counts}
    report["threads_before"], report["threads_after"] = threads_before, thread_names()
    report["fds_before"], report["fds_after"] = fds_before, background.quiet_fd_count()
    report["stream_closed"] = not _listening(port)
    background.finish()
    report["host_errors"] = background.errors
    report["after_stop"] = stdlib_state()
    print(json.dumps(report))


def _from_threads(port):
    """Two host threads relay at once: calls into gproxy come from any thread."""
    results = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, relay(port, t)))
               for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _error(func):
    try:
        func()
    except Exception as exc:
        return [type(exc).__name__, getattr(exc, "status", None), str(exc)]
    return None


def _listening(port):
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
