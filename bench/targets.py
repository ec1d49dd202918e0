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
import socket
import subprocess
import time

from bench import configs, procstat

HOST = "127.0.0.1"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find(name, *extra):
    found = shutil.which(name)
    if found:
        return found
    for d in extra or ("/usr/sbin", "/usr/local/sbin"):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def listening(port):
    """How many sockets on this host are in LISTEN on ``port`` (from /proc/net/tcp).

    SO_REUSEPORT workers each show up as one.
    """
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 3 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _start_time(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Service:
    """One process tree the harness owns."""

    name = "service"
    listeners = 1  # LISTEN sockets on ``port`` that mean "ready"
    cwd = None  # the run dir

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
        self.write_config()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.cwd or self.run_dir,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while listening(self.port) < self.listeners:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("%s did not start listening on %d; see %s:\n%s" % (
                    self.name, self.port, self.log_path, self.log_tail()))
            time.sleep(0.05)
        time.sleep(0.3)  # let multi-process targets finish forking their workers

    def write_config(self):
        pass

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
    note = "no proxy; clients connect to mosquitto"

    def __init__(self, broker):
        self.broker = broker

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

    def __init__(self, run_dir, binary, broker_port, nofile):
        super().__init__(run_dir)
        self.binary, self.broker_port, self.nofile = binary, broker_port, nofile
        self.port = free_port()
        self.maxconn = min(30000, (nofile - 100) // 2)  # two fds a session
        self.conf = os.path.join(run_dir, "haproxy.cfg")
        self.note = "mode tcp, nbthread 1, maxconn %d, ulimit-n %d, chash on the MQTT " \
            "client id" % (self.maxconn, nofile)

    def write_config(self):
        with open(self.conf, "w") as fh:
            fh.write(configs.haproxy(HOST, self.port, self.broker_port, self.maxconn,
                                     self.nofile))

    def command(self):
        return [self.binary, "-db", "-f", self.conf]


class Nginx(Service):
    name = "nginx"

    def __init__(self, run_dir, binary, broker_port, nofile):
        super().__init__(run_dir)
        self.binary, self.broker_port, self.nofile = binary, broker_port, nofile
        self.port = free_port()
        self.worker_connections = min(30000, nofile)
        self.conf = os.path.join(run_dir, "nginx.conf")
        self.note = "stream module, worker_processes 1 (+ master), worker_connections %d; " \
            "plain proxy_pass (nginx cannot hash on the MQTT client id)" % self.worker_connections

    def write_config(self):
        with open(self.conf, "w") as fh:
            fh.write(configs.nginx(HOST, self.port, self.broker_port, NGINX_STREAM_MODULE,
                                   self.run_dir, self.nofile, self.worker_connections))

    def command(self):
        return [self.binary, "-p", self.run_dir, "-e", self.log_path, "-c", self.conf]


class Gproxy(Service):
    def __init__(self, run_dir, name, python, broker_port, extra_args=(), workers=1):
        self.name = name
        self.listeners = workers  # each SO_REUSEPORT worker binds its own
        super().__init__(run_dir)
        self.python, self.broker_port, self.extra_args = python, broker_port, list(extra_args)
        self.port = free_port()
        self.admin_port = free_port()
        # Run from the repository so the working tree is what gets measured; the
        # config dir is not called "gproxy/", which would shadow the package.
        self.cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.dir = os.path.join(run_dir, "conf-" + name)
        os.makedirs(self.dir, exist_ok=True)
        self.conf = os.path.join(self.dir, "config.yaml")
        self.note = "mqtt-proxy route, chash on mqtt_client_id, max_connections 20000" + (
            ", args: %s" % " ".join(self.extra_args) if self.extra_args else "")

    def write_config(self):
        with open(self.conf, "w") as fh:
            fh.write(configs.gproxy(HOST, self.port, self.admin_port))
        with open(os.path.join(self.dir, "apisix.yaml"), "w") as fh:
            fh.write(configs.gproxy_routes(HOST, self.broker_port))

    def command(self):
        return [self.python, "-m", "gproxy", "-c", self.conf, "--log-level", "warn"] + \
            self.extra_args


class GproxyEmbedded(Gproxy):
    """gproxy started by ``gproxy.start()`` in an unpatched program (bench/embedded.py)."""

    def __init__(self, run_dir, python, broker_port):
        super().__init__(run_dir, "gproxy-embedded", python, broker_port)
        self.note = "mqtt-proxy route, chash on mqtt_client_id, gproxy.start() in a thread"

    def command(self):
        return [self.python, "-m", "bench.embedded", self.conf]


def gproxy_has_workers(python, cwd):
    """True if this gproxy's ``--help`` offers ``--workers``."""
    try:
        out = subprocess.run([python, "-m", "gproxy", "--help"], cwd=cwd, timeout=30,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out
