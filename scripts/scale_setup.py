"""The moving parts of scripts/scale.py: gproxy with a hub-latency probe,
mosquitto brokers, idle MQTT sessions and paced new clients.

Run as a script (``scale_setup.py CONFIG PROBE [GPROXY ARGS...]``) it is the
gproxy child: gproxy's CLI in this process plus a probe greenlet that sleeps
1 ms in a loop and logs every overshoot above 0.5 ms with how much of it the
hub's thread spent on a CPU (``thread_time``: the threadpool's and the etcd
watch thread's CPU is not the hub's).  With ``--workers`` the probe goes on in
every forked worker (a fork keeps the hub's greenlets and timers), each line
tagged with its process id.  Everything else here runs in scale.py's own
(plain, unpatched) process.
"""

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import mqttwire  # noqa: E402  (the repo's own MQTT packet builder)

HOST = "127.0.0.1"
KEY = "scale-script-key-0123456789abcdef"
PROBE_MS = 1.0


# -- the gproxy child, with a hub-latency probe -------------------------------------------

def serve(config, probe_path, *extra):
    """The gproxy child: gproxy's CLI in this process plus a probe greenlet."""
    from gevent import monkey
    monkey.patch_all()
    import gevent

    def probe():
        with open(probe_path, "a", buffering=1) as fh:
            while True:
                start, cpu = time.perf_counter(), time.thread_time()
                gevent.sleep(PROBE_MS / 1000)
                late = (time.perf_counter() - start) * 1000 - PROBE_MS
                if late > 0.5:  # and how much of it this process ran (vs. waited for a core)
                    ran = (time.thread_time() - cpu) * 1000
                    fh.write("%.4f %.3f %.3f %d\n" % (time.time(), late, min(late, ran),
                                                      os.getpid()))

    gc_log = open(probe_path + ".gc", "a", buffering=1)
    started = {}

    def collections(phase, info):  # the cyclic GC holds the hub too: log each pass
        if phase == "start":
            started["t"] = time.perf_counter()
        elif info["generation"] >= 1:
            gc_log.write("%.4f %d %.3f %d\n" % (time.time(), info["generation"],
                                                 (time.perf_counter() - started["t"]) * 1000,
                                                 os.getpid()))

    def census(every):  # what the collector holds, frozen and not, and the RSS
        with open(probe_path + ".census", "a", buffering=1) as fh:
            while True:
                gevent.sleep(every)
                if os.path.exists(probe_path + ".unfreeze"):  # asked: what did freezing keep?
                    os.unlink(probe_path + ".unfreeze")
                    gc.set_debug(gc.DEBUG_SAVEALL)
                    gc.unfreeze()
                    found = gc.collect()
                    kinds = {}
                    for obj in gc.garbage:
                        kinds[type(obj).__name__] = kinds.get(type(obj).__name__, 0) + 1
                    gc.set_debug(0)
                    del gc.garbage[:]
                    with open(probe_path + ".unfrozen", "w") as out:
                        json.dump({"collected": found, "kinds": sorted(
                            kinds.items(), key=lambda kv: -kv[1])[:15]}, out)
                    gc.freeze()
                with open("/proc/self/statm") as statm:
                    rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
                fh.write("%.4f %d %d %d %d\n" % (time.time(), gc.get_freeze_count(),
                                                  len(gc.get_objects()), rss, os.getpid()))

    gc.callbacks.append(collections)
    gevent.spawn(probe)
    if os.environ.get("GPROXY_CENSUS"):  # scripts/gc_soak.py
        gevent.spawn(census, float(os.environ["GPROXY_CENSUS"]))
    if os.environ.get("GPROXY_HOLDS_GC") == "startup":  # the policy before gcpolicy's rounds:
        from gproxy.runtime import gcpolicy         # start-up's objects frozen, nothing after
        gcpolicy._rounds = lambda policy, interval: None
    from gproxy import cli
    return cli.main(["-c", config, "--log-level", "error"] + list(extra))


def gc_passes(path, since, until, by_pid=False):
    """Generation 1 and 2 collections in gproxy between two times: ``[(gen, ms)]``
    (``by_pid``: ``{pid: [(gen, ms)]}``, one entry per gproxy process)."""
    out = {}
    with open(path + ".gc") as fh:
        for line in fh:
            at, gen, ms, pid = line.split()
            if since <= float(at) <= until:
                out.setdefault(int(pid), []).append((int(gen), float(ms)))
    return out if by_pid else [p for passes in out.values() for p in passes]


def probe_holds(path, since, until, by_pid=False):
    """Hub overshoots logged between two wall-clock times: ``[(wall ms, ran ms)]``
    (``by_pid``: ``{pid: [(wall ms, ran ms)]}``, one entry per gproxy process).

    ``wall``: how late the probe woke; ``ran``: how much of that the gproxy
    process spent on a CPU (the rest it waited for a core: a busy machine)."""
    out = {}
    with open(path) as fh:
        for line in fh:
            at, late, ran, pid = line.split()
            if since <= float(at) <= until:
                out.setdefault(int(pid), []).append((float(late), float(ran)))
    return out if by_pid else [h for holds in out.values() for h in holds]


# -- the Admin API ----------------------------------------------------------------------

def get(admin, path):
    req = urllib.request.Request("http://%s:%d/apisix/admin%s" % (HOST, admin, path),
                                 headers={"X-API-KEY": KEY})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return body, (time.perf_counter() - start) * 1000


class Poller:
    """The dashboard's requests without a browser: what gproxy alone pays for them
    (a page of 50 and stats every second; routes, upstreams and what would
    move every fifth second), so a rise can be told apart from the browser's
    own CPU on a small machine."""

    def __init__(self, admin):
        self.admin = admin
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while self.running:
            start = time.monotonic()
            paths = ["/gproxy/sessions?page=1&page_size=50&sort=connected_at", "/gproxy/stats"]
            if n % 5 == 0:
                paths += ["/stream_routes", "/upstreams",
                          "/gproxy/sessions?misplaced=true&page_size=10"]
            for path in paths:
                get(self.admin, path)
            n += 1
            time.sleep(max(0, 1 - (time.monotonic() - start)))

    def stop(self):
        self.running = False
        self.thread.join(5)


# -- processes ------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited with %s" % proc.returncode)
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on %d" % port)


def start_broker(workdir, name):
    port = free_port()
    conf = os.path.join(workdir, name + ".conf")
    with open(conf, "w") as fh:
        fh.write("listener %d %s\nallow_anonymous true\npersistence false\nlog_type none\n"
                 % (port, HOST))
        if os.geteuid() == 0:
            fh.write("user root\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def fleet_route(brokers):
    """The route every idle session takes: chash on the client id over ``brokers``."""
    return {"id": "fleet", "plugins": {"mqtt-proxy": {"protocol_name": "MQTT",
                                                       "protocol_level": 4}},
            "upstream": {"type": "chash", "key": "mqtt_client_id", "nodes": [
                {"host": HOST, "port": p, "weight": 1} for p in brokers]}}


def start_gproxy(workdir, brokers, deployment=None, env=None, extra=()):
    """gproxy with the probe, the fleet route in its store file (``deployment``: more
    ``deployment`` keys, e.g. an etcd store; ``env``: more environment; ``extra``: more
    CLI arguments, ``--workers N``): ``(process, stream port, admin port, probe log)``."""
    stream, admin = free_port(), free_port()
    with open(os.path.join(workdir, "apisix.yaml"), "w") as fh:
        fh.write("stream_routes:\n  - %s\nupstreams: []\n#END\n"
                 % json.dumps(fleet_route(brokers)))
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as fh:
        json.dump({"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, stream)]}},
                   "deployment": dict({"admin": {
                       "admin_listen": {"ip": HOST, "port": admin},
                       "admin_key": [{"name": "admin", "key": KEY, "role": "admin"}]}},
                       **(deployment or {})),
                   "gproxy": {"max_connections": 20000}}, fh)
    probe = os.path.join(workdir, "probe.log")
    open(probe, "w").close()
    log = open(os.path.join(workdir, "gproxy.log"), "wb")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), config, probe]
                            + list(extra), cwd=workdir, stdout=log, stderr=log,
                            env=dict(os.environ, **(env or {})))
    try:
        wait_port(admin, proc, 60)  # (forked workers take a while on a busy machine)
        wait_port(stream, proc, 60)
    except RuntimeError as exc:
        stop(proc)
        with open(log.name, errors="replace") as fh:
            raise RuntimeError("gproxy did not start (%s):\n%s" % (exc, fh.read()[-3000:]))
    return proc, stream, admin, probe


def finish(procs, workdir, keep, note):
    """Stop what a script started and drop (or keep, saying what is in it) its work dir."""
    for proc in procs:
        stop(proc)
    if keep:
        print("kept %s (%s)" % (workdir, note))
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- clients -----------------------------------------------------------------------------

def open_idle(port, count, batch=250, keepalive=0, prefix=b"idle-"):
    """``count`` idle MQTT sessions through gproxy, CONNACK checked.

    With no keep alive (0) gproxy's idle timeout is its default (600 s); with
    one, 1.5 times it: sessions that then stay silent are closed by gproxy.
    """
    socks = []
    template = mqttwire.ConnectTemplate(prefix, keepalive)
    while len(socks) < count:
        group = []
        for _ in range(min(batch, count - len(socks))):
            sock = socket.create_connection((HOST, port), timeout=30)
            sock.sendall(template.build(len(socks) + len(group)))
            group.append(sock)
        for sock in group:
            if recv_exact(sock, 4) != mqttwire.CONNACK_OK:
                raise RuntimeError("an idle session was refused")
        socks.extend(group)
    return socks


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("closed after %d bytes" % len(buf))
        buf += chunk
    return buf


def connack_latencies(port, seconds, rate, start_id):
    """New clients, one at a time, ``rate`` a second: ms from connect() to CONNACK."""
    template = mqttwire.ConnectTemplate(b"probe-")
    out, n = [], start_id
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        due = t0 + len(out) / rate
        time.sleep(max(0, due - time.monotonic()))
        start = time.perf_counter()
        sock = socket.create_connection((HOST, port), timeout=10)
        try:
            sock.sendall(template.build(n))
            recv_exact(sock, 4)
            out.append((time.perf_counter() - start) * 1000)
            sock.sendall(mqttwire.DISCONNECT)
        finally:
            sock.close()
        n += 1
    return out


if __name__ == "__main__":
    sys.exit(serve(*sys.argv[1:]))
