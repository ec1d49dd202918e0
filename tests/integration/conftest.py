"""Fixtures for gproxy's integration tests: real mosquitto brokers, a recording
sink upstream, and gproxy itself as a child process, all on loopback.

Every process started here is started with ``subprocess.Popen`` and stopped by
its own PID at teardown (terminate, wait, then kill).  Readiness is checked by
looking for the port in LISTEN state in ``/proc/net/tcp`` rather than by
connecting to it, so no probe connection shows up in gproxy's log, the sink or
a broker's log (a probe through a plain-TCP route would reach the upstream).
"""

import copy
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.integration.helpers import http_call
from tests.needs import require

HOST = "127.0.0.1"


def _find_mosquitto():
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


MOSQUITTO = _find_mosquitto()


@pytest.fixture(autouse=True)
def _needs_mosquitto():
    require(MOSQUITTO is not None, "integration suite needs mosquitto (apt-get install "
            "mosquitto); not found on PATH or in /usr/sbin")


# -- ports and readiness -------------------------------------------------------

def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_HANDED_OUT = set()  # never the same port twice in one test run


def free_port():
    """A loopback port nothing uses now, picked below the ephemeral range.

    ``bind(0)`` hands out ports from ``ip_local_port_range``, where every
    outgoing connection on the machine (thousands, with their TIME_WAITs, in
    the fleet and soak tests or another job on the box) takes its local port:
    such a port was sometimes taken again before gproxy or a broker bound it.
    A random port below that range is only taken by someone binding it on
    purpose; the probe binds without SO_REUSEADDR, so a TIME_WAIT refuses it.
    """
    rng = random.SystemRandom()
    for _ in range(200 if _EPHEMERAL_LOW > 11024 else 0):
        port = rng.randrange(10000, _EPHEMERAL_LOW)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n):
    """``n`` distinct free loopback ports (see ``free_port``)."""
    return [free_port() for _ in range(n)]


def _listening_in_proc(port):
    """True/False from /proc/net/tcp{,6}; None if /proc is not readable."""
    seen_file = False
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        seen_file = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False if seen_file else None


def accept_queue(port):
    """Connections the kernel completed on our LISTEN socket ``port`` that nobody
    has accepted yet (``rx_queue`` of its /proc/net/tcp row); None without /proc."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    return None


def wait_listening(port, proc=None, timeout=10.0, what="process"):
    """Wait until ``port`` is in LISTEN state (connect probe only without /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with status %s before listening on %d"
                               % (what, proc.returncode, port))
        state = _listening_in_proc(port)
        if state is None:
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                return
            except OSError:
                pass
        elif state:
            return
        time.sleep(0.02)
    raise RuntimeError("%s did not listen on %d within %.0fs" % (what, port, timeout))


def stop_process(proc, timeout=10.0):
    """SIGTERM the process we started, wait, then SIGKILL it (by PID only)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=5)


def wait_until(predicate, timeout, interval=0.02):
    """Poll ``predicate`` until it returns something truthy; return that or None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class LogFile:
    """A growing text file (a process's log) with offset marks and waits."""

    def __init__(self, path):
        self.path = path

    def text(self, since=0):
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                fh.seek(since)
                return fh.read()
        except FileNotFoundError:
            return ""

    def mark(self):
        """An offset: pass it as ``since`` to look only at what comes later."""
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def lines(self, since=0):
        return self.text(since).splitlines()

    def find(self, pattern, since=0):
        """Lines containing ``pattern`` (a substring, or a compiled regex)."""
        if isinstance(pattern, str):
            return [ln for ln in self.lines(since) if pattern in ln]
        return [ln for ln in self.lines(since) if pattern.search(ln)]

    def wait_for(self, pattern, timeout=5.0, since=0):
        """The first line matching ``pattern``; AssertionError with the log if none."""
        found = wait_until(lambda: self.find(pattern, since), timeout)
        if not found:
            raise AssertionError("no log line matching %r within %.1fs in %s; log:\n%s"
                                 % (getattr(pattern, "pattern", pattern), timeout,
                                    self.path, self.text(since)[-6000:]))
        return found[0]


# -- mosquitto -----------------------------------------------------------------

class Broker:
    """One mosquitto process on loopback."""

    def __init__(self, directory, name):
        self.host = HOST
        self.port = free_port()
        self.name = name
        self.conf_path = os.path.join(directory, "%s.conf" % name)
        self.log = LogFile(os.path.join(directory, "%s.log" % name))
        self.stderr_path = os.path.join(directory, "%s.stderr" % name)
        lines = ["listener %d %s" % (self.port, HOST),
                 "allow_anonymous true",
                 "log_dest file %s" % self.log.path,
                 "log_type all",
                 "connection_messages true",
                 "persistence false"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, mosquitto drops to user "mosquitto", which cannot write our log.
            import pwd
            lines.append("user %s" % pwd.getpwuid(0).pw_name)
        with open(self.conf_path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.proc = None

    @property
    def addr(self):
        return "%s:%d" % (self.host, self.port)

    def start(self):
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", self.conf_path],
                                         stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_listening(self.port, self.proc, what="mosquitto %s" % self.name)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)

    # what the broker saw
    def client_ids(self, since=0):
        """Client ids that completed CONNECT, in order."""
        return re.findall(r"New client connected from \S+ as (.*?) \(p\d",
                          self.log.text(since))

    def connections(self, since=0):
        """Peer ``ip:port`` of every TCP connection accepted (CONNECT or not)."""
        return re.findall(r"New connection from (\S+?) on port", self.log.text(since))

    def wait_for_client(self, client_id, timeout=5.0, since=0):
        ok = wait_until(lambda: client_id in self.client_ids(since), timeout)
        assert ok, "broker %s never saw client id %r; log:\n%s" % (
            self.name, client_id, self.log.text(since)[-4000:])


@pytest.fixture
def mosquitto(tmp_path):
    """Factory: ``mosquitto()`` starts a fresh broker; all are stopped at teardown."""
    brokers = []

    def make(name=None):
        broker = Broker(str(tmp_path), name or "broker%d" % len(brokers))
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture(scope="module")
def module_mosquitto(tmp_path_factory):
    """A module-wide broker factory, for modules that share one gproxy."""
    directory = str(tmp_path_factory.mktemp("brokers"))
    brokers = []

    def make(name=None):
        broker = Broker(directory, name or "broker%d" % len(brokers))
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()


# -- the recording sink ----------------------------------------------------------

class SinkConnection:
    """One connection the sink accepted: what arrived, and a way to answer."""

    def __init__(self, sock, peer, close_on_eof):
        self.sock = sock
        self.peer = peer
        self.close_on_eof = close_on_eof
        self._data = bytearray()
        self._cond = threading.Condition()
        self.eof = threading.Event()
        self.error = None
        self._thread = threading.Thread(target=self._read, daemon=True,
                                        name="sink-%s:%d" % peer)
        self._thread.start()

    def _read(self):
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                with self._cond:
                    self._data += chunk
                    self._cond.notify_all()
        except OSError as exc:
            self.error = exc
        finally:
            self.eof.set()
            with self._cond:
                self._cond.notify_all()
            if self.close_on_eof:
                self.close()

    @property
    def data(self):
        with self._cond:
            return bytes(self._data)

    def wait_for_bytes(self, n, timeout=5.0):
        """Wait until ``n`` bytes (or EOF) have arrived; return what arrived."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._data) >= n or self.eof.is_set(), timeout)
            return bytes(self._data)

    def send(self, data):
        self.sock.sendall(data)

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class RecordingSink:
    """A raw TCP upstream that records every connection and every byte received.

    With ``close_on_eof`` (the default) a connection is closed as soon as its
    peer half-closes, so gproxy's session can end; pass False to keep it open
    and answer by hand.
    """

    def __init__(self, close_on_eof=True):
        self.close_on_eof = close_on_eof
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.host, self.port = self.listener.getsockname()
        self.connections = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="sink")
        self._thread.start()

    @property
    def addr(self):
        return "%s:%d" % (self.host, self.port)

    def node(self, weight=1):
        return {"host": self.host, "port": self.port, "weight": weight}

    def _accept(self):
        while not self._stopping.is_set():
            try:
                sock, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            conn = SinkConnection(sock, peer, self.close_on_eof)
            with self._lock:
                self.connections.append(conn)

    def count(self):
        with self._lock:
            return len(self.connections)

    def wait_for_connection(self, index=0, timeout=5.0):
        """The ``index``-th connection ever accepted, waiting for it if needed."""
        ok = wait_until(lambda: self.count() > index, timeout)
        assert ok, "the sink got no connection #%d within %.1fs" % (index, timeout)
        with self._lock:
            return self.connections[index]

    def settle(self, timeout=5.0):
        """How many connections reached the sink before now (a condition, not a sleep).

        A probe connection of our own goes through the same accept queue, which
        is first in, first out: once the sink has recorded the probe, it has
        recorded every connection that reached it earlier.  The probe is then
        dropped from the record, so counts and indexes stay as they were.
        """
        probe = socket.create_connection((self.host, self.port), timeout=timeout)
        mine = probe.getsockname()

        def position():
            with self._lock:
                found = [i for i, c in enumerate(self.connections) if c.peer == mine]
            return found and found[:1]
        try:
            found = wait_until(position, timeout, interval=0.005)
            assert found, "the sink did not record its own probe within %.1fs" % timeout
            with self._lock:
                conn = self.connections.pop(found[0])
            conn.close()
            return found[0]
        finally:
            probe.close()

    def close(self):
        self._stopping.set()
        self._thread.join(timeout=2)
        self.listener.close()
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            conn.close()


@pytest.fixture
def sink():
    s = RecordingSink()
    yield s
    s.close()


@pytest.fixture
def holding_sink():
    """A sink that keeps connections open after the peer's EOF (half-close tests)."""
    s = RecordingSink(close_on_eof=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def module_sink():
    s = RecordingSink()
    yield s
    s.close()


# -- gproxy --------------------------------------------------------------------

def mqtt_route(nodes, route_id=1, level=4, name="MQTT", type_="chash", **extra):
    """A stream route with the mqtt-proxy plugin and an inline upstream."""
    upstream = {"type": type_, "nodes": nodes}
    if type_ == "chash":
        upstream["key"] = "mqtt_client_id"
    route = {"id": route_id,
             "plugins": {"mqtt-proxy": {"protocol_name": name, "protocol_level": level}},
             "upstream": upstream}
    route.update(extra)
    return route


def tcp_route(nodes, route_id=1, **extra):
    """A plain TCP stream route (no plugin) with an inline roundrobin upstream."""
    route = {"id": route_id, "upstream": {"type": "roundrobin", "nodes": nodes}}
    route.update(extra)
    return route


def node(target, weight=1):
    """``{host, port, weight}`` for a Broker, a RecordingSink or an int port."""
    if isinstance(target, int):
        return {"host": HOST, "port": target, "weight": weight}
    return {"host": target.host, "port": target.port, "weight": weight}


def _merge(base, extra):
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


class Gproxy:
    """One ``python -m gproxy`` child process with its own config directory."""

    def __init__(self, directory, stream_routes, upstreams=(), config=None, listeners=1,
                 workers=1, preexec_fn=None, log_level="info", env=None):
        self.dir = directory
        self.env = env or {}  # extra environment variables for the child
        self.log_level = log_level  # None: the config file's nginx_config.error_log_level
        self.nworkers = workers
        self.preexec_fn = preexec_fn
        os.makedirs(directory, exist_ok=True)
        *self.ports, self.admin_port, self.control_port, self.metrics_port = free_ports(
            listeners + 3)
        self.port = self.ports[0]
        self.config_path = os.path.join(directory, "config.yaml")
        self.routes_path = os.path.join(directory, "apisix.yaml")
        self.log_file = LogFile(os.path.join(directory, "gproxy.log"))
        cfg = {
            "apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, p) for p in self.ports]},
                       "control": {"ip": HOST, "port": self.control_port}},
            "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": self.admin_port}}},
            "plugin_attr": {"prometheus": {"export_addr": {"ip": HOST,
                                                           "port": self.metrics_port}}},
            "gproxy": {"store": {"backend": "file", "path": "apisix.yaml"},
                       "preread": {"timeout": 2, "buffer_size": 16384}},
        }
        _merge(cfg, config(self.ports) if callable(config) else config)
        self.cfg = cfg
        self.write_config(cfg)
        if callable(stream_routes):  # routes that need the listener ports
            stream_routes = stream_routes(self.ports)
        self.rewrite_routes(stream_routes, upstreams)
        self.proc = None

    def write_config(self, cfg):
        """Replace config.yaml (it takes effect at start, or on SIGHUP)."""
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
        os.replace(tmp, self.config_path)

    # HTTP: Admin API, control API, metrics
    def http(self, port, path, method="GET", body=None, headers=None, timeout=5.0):
        """``(status, body bytes)`` of one request to a gproxy HTTP listener."""
        return http_call(port, method, path, body, headers, timeout)

    def admin(self, method, path, body=None):
        import json
        data = None if body is None else json.dumps(body)
        status, raw = self.http(self.admin_port, "/apisix/admin" + path, method, data,
                                {"X-API-KEY": "edd1c9f034335f136f87ad84b625c8f1"})
        return status, json.loads(raw) if raw.strip() else None

    def healthcheck(self, path=""):
        import json
        status, raw = self.http(self.control_port, "/v1/healthcheck" + path)
        return status, json.loads(raw)

    def metrics(self):
        """The scraped metrics as ``{(name, frozenset(labels.items())): value}``."""
        from prometheus_client.parser import text_string_to_metric_families
        status, raw = self.http(self.metrics_port, "/apisix/prometheus/metrics")
        assert status == 200, raw
        out = {}
        for family in text_string_to_metric_families(raw.decode()):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    def rewrite_routes(self, stream_routes, upstreams=(), ssls=()):
        """Replace apisix.yaml atomically (temp file + rename), as a hand edit would."""
        doc = {"stream_routes": list(stream_routes), "upstreams": list(upstreams)}
        if ssls:
            doc["ssls"] = list(ssls)
        body = yaml.safe_dump(doc, sort_keys=False)
        self.write_routes_text(body + "#END\n")

    def write_routes_text(self, text):
        """Replace apisix.yaml with ``text`` as is (to test edits that must be refused)."""
        tmp = self.routes_path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.routes_path)

    def start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_file.path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gproxy", "-c", self.config_path, "--workers",
                 str(self.nworkers)] + (["--log-level", self.log_level] if self.log_level else []),
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=self.preexec_fn)
        try:
            # the stream listeners, then the HTTP ones (started after them)
            for port in self.ports + [self.admin_port, self.control_port, self.metrics_port]:
                wait_listening(port, self.proc, timeout=15, what="gproxy")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError("%s; log:\n%s" % (exc, self.log())) from None
        return self

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    # the log
    def log(self, since=0):
        return self.log_file.text(since)

    def mark(self):
        return self.log_file.mark()

    def find(self, pattern, since=0):
        return self.log_file.find(pattern, since)

    def wait_for_log(self, pattern, timeout=5.0, since=0):
        return self.log_file.wait_for(pattern, timeout, since)

    def session_lines(self, client, since=0):
        """gproxy's lines about one client's session.

        ``client`` is the client's local port on 127.0.0.1, or an ``(ip, port)`` pair.
        Lines are in nginx's shape: the session's first line names the client's
        address (``*12 client 127.0.0.1:40000 connected to 0.0.0.0:9100``) and every
        later one carries the same ``<pid>#0: *12`` prefix.
        """
        ip, port = client if isinstance(client, tuple) else (HOST, client)
        opened = re.compile(r" (\d+)#0: \*(\d+) client %s:%d connected to "
                            % (re.escape(ip), port))
        lines = self.log_file.lines(since)
        for i, line in enumerate(lines):
            found = opened.search(line)
            if found:
                prefix = " %s#0: *%s " % found.groups()
                return [ln for ln in lines[i + 1:] if prefix in ln]
        return []

    def wait_for_session_line(self, client, pattern, timeout=5.0, since=0):
        """The first line about ``client``'s session (see above) matching ``pattern``."""
        def match():
            return [ln for ln in self.session_lines(client, since)
                    if (pattern in ln if isinstance(pattern, str) else pattern.search(ln))]
        found = wait_until(match, timeout)
        if not found:
            raise AssertionError("no line %r for client %s within %.1fs; log:\n%s"
                                 % (getattr(pattern, "pattern", pattern), client,
                                    timeout, self.log(since)[-6000:]))
        return found[0]


def _gproxy_factory(make_dir):
    procs = []

    def make(stream_routes, upstreams=(), config=None, listeners=1, **kwargs):
        proxy = Gproxy(make_dir(), stream_routes, upstreams, config, listeners, **kwargs)
        procs.append(proxy)
        return proxy.start()

    return make, procs


def _stop_all(procs):
    """Stop every gproxy; then fail if any of them logged a Python traceback."""
    for proxy in procs:
        proxy.stop()
    crashed = [p for p in procs if "Traceback (most recent call last)" in p.log()]
    if crashed:
        pytest.fail("gproxy logged a traceback:\n%s" % crashed[0].log()[-6000:])


@pytest.fixture
def gproxy(tmp_path):
    """Factory: ``gproxy(stream_routes, upstreams=(), config=None, listeners=1)``.

    ``stream_routes`` may be a callable that takes the list of listener ports.
    """
    counter = iter(range(1000))
    make, procs = _gproxy_factory(lambda: str(tmp_path / ("gproxy%d" % next(counter))))
    yield make
    _stop_all(procs)


@pytest.fixture(scope="module")
def module_gproxy(tmp_path_factory):
    """Module-wide gproxy factory (the processes live until the module ends)."""
    make, procs = _gproxy_factory(lambda: str(tmp_path_factory.mktemp("gproxy")))
    yield make
    _stop_all(procs)
