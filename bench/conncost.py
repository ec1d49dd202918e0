"""The cost of one short MQTT session in gproxy, counted rather than timed.

    python -m bench.conncost [--connections 500] [--tool callgrind|strace|py-spy|none]
                             [--balancer chash|roundrobin|least_conn|ewma] [--access-log]
                             [--routing plain|vars|vars-1k] [--target gproxy|haproxy]

Starts mosquitto and gproxy (one mqtt-proxy route, chash on the client id, one
node) on loopback, or HAProxy with the benchmark's configuration (``--target
haproxy``: nbthread 1, chash on the MQTT client id), warms it up, then runs
``--connections`` sessions one after another (connect, CONNECT, CONNACK,
DISCONNECT, close) and reports what the proxy spent on them:

* ``callgrind``: user-space instructions per session, from valgrind's
  instruction count (zeroed after the warm-up, dumped after the run).  The
  count is the same from run to run whatever else the machine is doing, so a
  change of a few percent is visible on a shared 2-core box where timing is not.
  ``instructions_per_session`` is the larger of the dump's ``summary`` and
  ``totals`` lines (the figure quoted since this tool exists);
  ``program_totals_per_session`` is the ``summary`` alone (callgrind_annotate's
  PROGRAM TOTALS).  ``totals`` also grows with the size of what was built before
  the zeroing (a table of 1,000 routes adds about 190,000 a session to it and
  nothing to ``summary``): compare route tables of different sizes by the latter.
* ``strace``: system calls per session, by name (``strace -c -f``; two runs,
  of N and 2N sessions, and their difference, so start-up does not count).
* ``py-spy``: gproxy's hot Python frames (attached after the warm-up).
* ``none``: wall and CPU time, for reference only.

The run directory (configs, logs, the tool's output) is removed at the end,
unless ``CONNCOST_KEEP=1`` is set (e.g. for ``callgrind_annotate``).

Every tool also reports the process's user and system CPU per session from
/proc (under callgrind or strace: the tool's, so only the counts are
meaningful there).

``--routing`` picks the route table: ``plain`` (that one route), ``vars``
(routes chosen by the CONNECT, docs/routing.md: a tenant by username, the
sessions' own route by a client-id regex, a fallback; configs.gproxy_vars_routes)
or ``vars-1k`` (the same with 1,000 username tenants, which the route table
indexes).  The difference between ``plain`` and ``vars`` is what choosing the
route by the CONNECT costs a session.

Sessions run sequentially, so this measures cost, not concurrency.
"""

import argparse
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from bench import configs
from bench.mqttwire import connect as connect_packet
from bench.targets import HOST, find, free_port, listening

DISCONNECT = b"\xe0\x00"


def _wait_listening(port, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited with %s" % proc.returncode)
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError("nothing listens on %d after %.0fs" % (port, timeout))


def one_session(port, i):
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect_packet(b"cost-%d" % i))
        got = b""
        while len(got) < 4:
            chunk = sock.recv(4 - len(got))
            if not chunk:
                raise RuntimeError("closed before CONNACK")
            got += chunk
        sock.sendall(DISCONNECT)


def _sessions(port, first, count):
    for i in range(first, first + count):
        one_session(port, i)


ROUTINGS = {"plain": None, "vars": 1, "vars-1k": 1000}  # username tenants beside the regex


def _config(run_dir, port, broker, balancer="chash", access_log=False, routing="plain"):
    """One route to one node (``balancer``), or ``routing``'s table of routes with
    vars (chash); ``access_log``: the stream access log on."""
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        fh.write("apisix:\n  enable_admin: false\n  stream_proxy:\n    tcp: ['%s:%d']\n"
                 "nginx_config:\n  error_log_level: warn\n" % (HOST, port))
        if access_log:
            fh.write("  stream:\n    enable_access_log: true\n")
    with open(os.path.join(run_dir, "apisix.yaml"), "w") as fh:
        if ROUTINGS[routing] is None:
            fh.write("stream_routes:\n  - id: 1\n    plugins:\n      mqtt-proxy:\n"
                     "        protocol_level: 4\n    upstream:\n      type: %s\n"
                     "      key: mqtt_client_id\n      nodes:\n        '%s:%d': 1\n"
                     "upstreams: []\n#END\n" % (balancer, HOST, broker))
        else:  # the order route (port 1: never matched) is harmless here
            fh.write(configs.gproxy_vars_routes(HOST, port, broker, 1, broker, ROUTINGS[routing]))
    return os.path.join(run_dir, "config.yaml")


def _haproxy_config(run_dir, port, broker):
    path = os.path.join(run_dir, "haproxy.cfg")
    with open(path, "w") as fh:
        fh.write(configs.haproxy(HOST, port, broker, 1000, 4096, free_port(), free_port()))
    return path


def _command(tool, out, python, conf, target="gproxy"):
    gproxy = [python, "-m", "gproxy", "-c", conf]
    if target == "haproxy":
        gproxy = [find("haproxy"), "-db", "-f", conf]
    if tool == "callgrind":
        return ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                "--dump-instr=no", "--collect-atstart=yes"] + gproxy
    if tool == "strace":
        return ["strace", "-f", "-c", "-o", out] + gproxy
    if tool == "strace-log":  # every call with its arguments, to read by hand
        return ["strace", "-f", "-tt", "-o", out] + gproxy
    return gproxy  # (py-spy attaches after the warm-up: start-up is not sampled)


def _callgrind_total(path):
    total = 0
    for name in os.listdir(os.path.dirname(path)):
        if name.startswith(os.path.basename(path)):
            with open(os.path.join(os.path.dirname(path), name)) as fh:
                for line in fh:
                    if line.startswith("summary:") or line.startswith("totals:"):
                        total = max(total, int(line.split()[1]))
    return total


def _callgrind_summary(path):
    """The ``summary:`` of the dump taken after the run (``<out>.1``): the instructions
    between the zeroing and the dump, callgrind_annotate's PROGRAM TOTALS."""
    with open(path + ".1") as fh:
        for line in fh:
            if line.startswith("summary:"):
                return int(line.split()[1])
    return 0


def measure(tool, connections, warmup, python, clients=1, target="gproxy", **route):
    run_dir = tempfile.mkdtemp(prefix="gproxy-cost-")
    broker_port, port = free_port(), free_port()
    mosq = subprocess.Popen([find("mosquitto"), "-p", str(broker_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    out = os.path.join(run_dir, "%s.out" % tool)
    conf = (_haproxy_config(run_dir, port, broker_port) if target == "haproxy"
            else _config(run_dir, port, broker_port, **route))
    proc = subprocess.Popen(_command(tool, out, python, conf, target),
                            cwd=run_dir, env=dict(os.environ, PYTHONHASHSEED="0"), stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(run_dir, "gproxy.log"), "w"),
                            start_new_session=True)
    try:
        _wait_listening(broker_port, mosq, 10)
        _wait_listening(port, proc, 600 if route.get("routing") == "vars-1k" else 120)  # 1,000 routes
        for i in range(warmup):
            one_session(port, i)
        if tool == "callgrind":
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                           stdout=subprocess.DEVNULL)
        spy = _py_spy(python, proc.pid, out) if tool == "py-spy" else None
        cpu0, t0 = _cpu(proc.pid), time.monotonic()
        if clients > 1:  # concurrent clients, as in the benchmark's connection rate
            with multiprocessing.get_context("fork").Pool(clients) as workers:
                workers.starmap(_sessions, [(port, warmup + k * connections, connections)
                                            for k in range(clients)])
            connections *= clients
        else:
            _sessions(port, warmup, connections)
        cpu1, t1 = _cpu(proc.pid), time.monotonic()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            spy.wait(timeout=60)
        if tool == "callgrind":
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                           stdout=subprocess.DEVNULL)
    finally:
        for p in (proc, mosq):  # each leads its own process group (the tool and gproxy)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT if p is proc else signal.SIGTERM)
        for p in (proc, mosq):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    result = {"connections": connections, "wall_s": t1 - t0,
              "user_us_per_session": (cpu1[0] - cpu0[0]) / connections * 1e6,
              "system_us_per_session": (cpu1[1] - cpu0[1]) / connections * 1e6}
    if tool == "callgrind":
        result["instructions_per_session"] = _callgrind_total(out) / connections
        result["program_totals_per_session"] = _callgrind_summary(out) / connections
    elif tool == "strace":
        result["syscalls"] = _strace_counts(out)
    elif tool == "strace-log":
        result["log"] = out
    elif tool == "py-spy":
        result["profile"] = _py_spy_summary(out)
    if tool == "strace-log" or os.environ.get("CONNCOST_KEEP"):
        result["run_dir"] = run_dir  # the log to read, or the tool's files (callgrind_annotate)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _cpu(pid):
    """(user, system) CPU seconds of ``pid`` so far."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, IndexError):
        return 0.0, 0.0


def _py_spy(python, pid, out):
    """py-spy sampling ``pid`` (gproxy, warmed up) until SIGINT; raw stacks into ``out``."""
    spy = subprocess.Popen([os.path.join(os.path.dirname(python), "py-spy"), "record",
                            "--pid", str(pid), "--rate", "1000", "--nonblocking",
                            "--format", "raw", "--output", out],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first session
    return spy


def _py_spy_summary(path):
    from bench.profile import summarise
    found = summarise(path, top=40)
    lines = ["%d samples" % found["samples"], "self:"]
    lines += ["  %5.1f%%  %s" % (100 * share, frame) for frame, share in found["self"]]
    lines += ["inclusive:"]
    lines += ["  %5.1f%%  %s" % (100 * share, frame) for frame, share in found["inclusive"]]
    return "\n" + "\n".join(lines)


def _strace_counts(path):
    counts = {}
    with open(path) as fh:
        for line in fh:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m:
                counts[m.group(2)] = int(m.group(1))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.conncost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes, each running --connections sessions")
    parser.add_argument("--tool", choices=("callgrind", "strace", "strace-log", "py-spy", "none"),
                        default="callgrind")
    parser.add_argument("--target", choices=("gproxy", "haproxy"), default="gproxy")
    parser.add_argument("--routing", choices=sorted(ROUTINGS), default="plain",
                        help="the route table (see above)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter with gproxy installed (default: this one)")
    parser.add_argument("--balancer", default="chash",
                        choices=("chash", "roundrobin", "least_conn", "ewma"))
    parser.add_argument("--access-log", action="store_true",
                        help="with the stream access log on (its writer thread counts too)")
    args = parser.parse_args(argv)
    if args.tool == "py-spy" and args.target != "gproxy":
        parser.error("--tool py-spy samples Python: gproxy only")
    if args.routing != "plain" and args.target != "gproxy":
        parser.error("--routing: gproxy only (HAProxy's config has the one route)")
    route = {"balancer": args.balancer, "access_log": args.access_log, "routing": args.routing}
    result = measure(args.tool, args.connections, args.warmup, args.python, args.clients,
                     args.target, **route)
    if args.tool == "strace":
        more = measure(args.tool, 2 * args.connections, args.warmup, args.python,
                       args.clients, args.target, **route)["syscalls"]
        per = {name: (more.get(name, 0) - result["syscalls"].get(name, 0))
               / (args.connections * args.clients)
               for name in set(more) | set(result["syscalls"]) if name != "total"}
        result["syscalls"] = per
    for key, value in result.items():
        if key == "syscalls":
            print("syscalls per session: %.1f" % sum(value.values()))
            for name, n in sorted(value.items(), key=lambda kv: -kv[1]):
                if n >= 0.05:
                    print("  %-16s %6.2f" % (name, n))
        else:
            print("%s: %s" % (key, round(value, 1) if isinstance(value, float) else value))


if __name__ == "__main__":
    main()
