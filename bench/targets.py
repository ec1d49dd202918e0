"""The processes under test: the broker, and each target the load goes through.

Every process here is started by the harness with ``subprocess.Popen`` in its
own session, and stopped by PID (SIGTERM, wait, SIGKILL), together with any
descendants it forked (nginx's worker, gproxy's ``--workers``), identified by
PID and start time so a recycled PID is never signalled.  All listeners are on
127.0.0.1 ports picked here.  Config files and logs live in the run directory.
"""

import os
import shutil
import signal
import subprocess
import time

from bench import configs, procstat, tlsbench
from bench.ports import HOST, free_port, listening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def find(name, *extra):
    found = shutil.which(name)
    if found:
        return found
    for d in extra or ("/usr/sbin", "/usr/local/sbin"):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _start_time(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Service:
    """One process tree the harness owns."""

    name = "service"
    listeners = 1  # LISTEN sockets on each of ``ready_ports()`` that mean "ready"
    workers = 1  # processes that carry sessions (the per-core mode gives each a CPU)
    cwd = None  # the run dir
    order_port = None  # the listener that leads to the order probe's sink
    workloads = None  # the only workloads that apply (None: all)
    pki = None  # tlsbench.Pki: also listen with TLS on ``tls_port`` (the TLS workloads)
    tls_port = None

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.proc = None
        self.port = None
        self.log_path = os.path.join(run_dir, "%s.log" % self.name)
        self._log = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def command(self):
        raise NotImplementedError

    def start(self, timeout=20.0):
        self.pick_ports()
        self.write_config()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.cwd or self.run_dir,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while any(listening(p) < self.listeners for p in self.ready_ports()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("%s did not start listening on %s; see %s:\n%s" % (
                    self.name, self.ready_ports(), self.log_path, self.log_tail()))
            time.sleep(0.05)
        time.sleep(0.3)  # let multi-process targets finish forking their workers

    def write_config(self):
        pass

    def pick_ports(self):
        """Choose listening ports right before each start (see ``free_port``)."""

    def ready_ports(self):
        return [p for p in (self.port, self.order_port, self.tls_port) if p is not None]

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_tail(self, since=0, limit=4000):
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                return fh.read()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout=15.0):
        if self.proc is None:
            return
        tree = [(pid, _start_time(pid)) for pid in procstat.descendants(self.proc.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid, started in tree[1:]:  # leftovers we started, still the same process
            if started is not None and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None


class Mosquitto(Service):
    name = "mosquitto"

    def __init__(self, run_dir, binary):
        super().__init__(run_dir)
        self.binary = binary
        self.port = free_port()
        self.conf = os.path.join(run_dir, "mosquitto.conf")

    def write_config(self):
        with open(self.conf, "w") as fh:
            fh.write(configs.mosquitto(HOST, self.port))

    def command(self):
        return [self.binary, "-c", self.conf]


class Direct:
    """No proxy: clients dial the broker itself."""

    name = "direct"
    pid = None
    workers = 0
    workloads = None
    note = "no proxy; clients connect to mosquitto (the order probe: to its sink)"

    def __init__(self, broker, sink_port):
        self.broker = broker
        self.order_port = sink_port

    @property
    def port(self):
        return self.broker.port

    def start(self):
        pass

    def stop(self):
        pass

    def log_size(self):
        return 0

    def log_tail(self, since=0, limit=4000):
        return ""


class HAProxy(Service):
    name = "haproxy"

    def __init__(self, run_dir, binary, broker_port, nofile, sink_port):
        super().__init__(run_dir)
        self.binary, self.broker_port, self.nofile = binary, broker_port, nofile
        self.sink_port = sink_port
        self.maxconn = min(30000, (nofile - 100) // 2)  # two fds a session
        self.conf = os.path.join(run_dir, "haproxy.cfg")
        self.note = "mode tcp, nbthread 1, maxconn %d, ulimit-n %d, chash on the MQTT " \
            "client id" % (self.maxconn, nofile)

    def pick_ports(self):
        self.port, self.order_port = free_port(), free_port()
        self.tls_port = free_port() if self.pki else None

    def write_config(self):
        with open(self.conf, "w") as fh:
            fh.write(tlsbench.haproxy(configs.haproxy(
                HOST, self.port, self.broker_port, self.maxconn, self.nofile, self.order_port,
                self.sink_port), self.pki, self.tls_port))

    def command(self):
        return [self.binary, "-db", "-f", self.conf]


class Nginx(Service):
    name = "nginx"

    def __init__(self, run_dir, binary, broker_port, nofile, sink_port):
        super().__init__(run_dir)
        self.binary, self.broker_port, self.nofile = binary, broker_port, nofile
        self.sink_port = sink_port
        self.worker_connections = min(30000, nofile)
        self.conf = os.path.join(run_dir, "nginx.conf")
        self.note = "stream module, worker_processes 1 (+ master), worker_connections %d; " \
            "plain proxy_pass (nginx cannot hash on the MQTT client id)" % self.worker_connections

    def pick_ports(self):
        self.port, self.order_port = free_port(), free_port()
        self.tls_port = free_port() if self.pki else None

    def write_config(self):
        with open(self.conf, "w") as fh:
            fh.write(tlsbench.nginx(configs.nginx(
                HOST, self.port, self.broker_port, NGINX_STREAM_MODULE, self.run_dir,
                self.nofile, self.worker_connections, self.order_port, self.sink_port),
                self.pki, self.tls_port))

    def command(self):
        return [self.binary, "-p", self.run_dir, "-e", self.log_path, "-c", self.conf]


class Gproxy(Service):
    websocket = True  # its mqtt-proxy route also takes MQTT over WebSocket (the ws workloads)

    def __init__(self, run_dir, name, python, broker_port, sink_port, extra_args=(), workers=1,
                 own_python=True):
        self.name = name
        self.listeners = self.workers = workers  # each SO_REUSEPORT worker binds its own
        super().__init__(run_dir)
        self.python, self.broker_port, self.extra_args = python, broker_port, list(extra_args)
        self.sink_port = sink_port
        self.dir = os.path.join(run_dir, "conf-" + name)
        os.makedirs(self.dir, exist_ok=True)
        # With the harness's own interpreter, run from the repository so the
        # working tree is what gets measured; another interpreter (an older
        # build in its own venv) runs from the config dir and imports its own
        # gproxy.  The config dir is not called "gproxy/", which would shadow it.
        self.cwd = ROOT if own_python else self.dir
        self.conf = os.path.join(self.dir, "config.yaml")
        self.note = "mqtt-proxy route, chash on mqtt_client_id, max_connections 20000" + (
            ", args: %s" % " ".join(self.extra_args) if self.extra_args else "") + (
            "" if own_python else ", interpreter %s" % python)

    def pick_ports(self):
        self.port, self.order_port, self.admin_port = free_port(), free_port(), free_port()
        self.tls_port = free_port() if self.pki else None

    def write_config(self):
        with open(self.conf, "w") as fh:
            fh.write(tlsbench.gproxy(configs.gproxy(HOST, self.port, self.admin_port,
                                                    self.order_port), self.pki, self.tls_port))
        with open(os.path.join(self.dir, "apisix.yaml"), "w") as fh:
            fh.write(tlsbench.gproxy_routes(configs.gproxy_routes(
                HOST, self.port, self.broker_port, self.order_port, self.sink_port),
                self.pki, self.tls_port, self.broker_port))

    def command(self):
        return [self.python, "-m", "gproxy", "-c", self.conf, "--log-level", "warn"] + \
            self.extra_args


class GproxyVars(Gproxy):
    """gproxy with routes chosen by the CONNECT: the cost of ``vars`` routing.

    Its listener has three routes with the same upstream (configs.gproxy_vars_routes):
    a tenant by username (priority 10), the load's by a client-id regex, a fallback.
    Every session is read under the candidates' terms and refined by its CONNECT;
    compare its rows with the ``gproxy`` target's.  Only the workloads where the route
    is chosen run (``workloads``): a relaying session costs the same either way.
    """

    workloads = ("conn", "wsconn", "core-conn")

    def __init__(self, run_dir, python, broker_port, sink_port, extra_args=(), own_python=True):
        super().__init__(run_dir, "gproxy-vars", python, broker_port, sink_port, extra_args,
                         own_python=own_python)
        self.note = "as gproxy, routes chosen by the CONNECT: a username tenant, the " \
            "load's client-id regex route, a fallback; only %s" % ", ".join(self.workloads)

    def write_config(self):
        super().write_config()
        with open(os.path.join(self.dir, "apisix.yaml"), "w") as fh:
            fh.write(configs.gproxy_vars_routes(HOST, self.port, self.broker_port,
                                                self.order_port, self.sink_port))


class GproxyEmbedded(Gproxy):
    """gproxy started by ``gproxy.start()`` in an unpatched program (bench/embedded.py)."""

    def __init__(self, run_dir, python, broker_port, sink_port, own_python=True):
        super().__init__(run_dir, "gproxy-embedded", python, broker_port, sink_port,
                         own_python=own_python)
        self.note = "mqtt-proxy route, chash on mqtt_client_id, gproxy.start(mode='thread')" \
            + ("" if own_python else ", interpreter %s" % python)

    def command(self):
        if self.cwd == ROOT:
            return [self.python, "-m", "bench.embedded", self.conf, "--mode", "thread"]
        # Another interpreter runs outside this checkout (see Gproxy): hand it the
        # program's text, so it imports its own gproxy and nothing from here.
        with open(os.path.join(ROOT, "bench", "embedded.py")) as fh:
            return [self.python, "-c", fh.read(), self.conf, "--mode", "thread"]


def gproxy_has_workers(python, cwd):
    """True if this gproxy's ``--help`` offers ``--workers``."""
    try:
        out = subprocess.run([python, "-m", "gproxy", "--help"], cwd=cwd, timeout=30,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out
