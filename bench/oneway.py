"""One direction of bulk MQTT through a proxy: CPU per GB, counted or timed.

    python -m bench.oneway                        # 16 KiB PUBLISHes, 64 KiB sends, 1 GB, 5 runs
    python -m bench.oneway --size 64 --gb 0.05    # small messages (what tracking costs)
    python -m bench.oneway --quick                # 0.2 GB, 3 runs (CI)
    python -m bench.oneway --tool callgrind --targets gproxy --gb 0.02   # instructions per MB
    python -m bench.oneway --python /tmp/main/.venv/bin/python           # another build

A client connects through the target, sends one CONNECT, then ``--gb`` of
QoS 0 PUBLISHes with ``--size``-byte payloads, ``--send`` bytes per
``sendall`` (many PUBLISHes a call: a batched publisher), closes its write
side and waits for the proxy to close; a sink (a forked process, no broker)
reads everything and discards it.  No broker and no subscriber, so the
proxy's own cost is all there is to see: the CPU of its process tree per GB
delivered (/proc, utime + stime) and the rate.  Targets, each started once
and run ``--repeat`` times in turn, interleaved: ``haproxy`` (the
benchmark's config, ``nbthread 1``), ``gproxy`` (an mqtt-proxy route: the
relay tracks packet boundaries and walks large packets), ``gproxy-copy``
(the same with walking off: every byte through Python, as on kernels
without SO_PEEK_OFF).  Medians are reported.

``--tool callgrind`` runs gproxy under valgrind and reports user-space
instructions per MB instead: the same from run to run whatever else the
machine does, so two builds compare on a shared machine (``--python``).

The main benchmark runs the same as its **oneway16k** workload
(``workload`` below): through each target's second listener (the order
probe's route) to a discarding reader on the order probe's sink socket, so
it sits in the table beside HAProxy's and nginx's figures.
"""

import argparse
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench import mqttwire, procstat
from bench import targets as tg
from bench.ports import HOST

#: gproxy with walking off (the relay copies every byte), for ``gproxy-copy``.
NO_WALK = ("import sys; import gproxy.proxy.relay.direction as d; d.PEEK_WALK = False; "
           "from gproxy import cli; sys.exit(cli.main(sys.argv[1:]))")


def sink():
    """A forked reader on loopback: ``(port, pid)``; each connection is read to its end."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(16)
    pid = os.fork()
    if pid == 0:
        buf = bytearray(1 << 18)
        try:
            while True:
                conn, _ = listener.accept()
                while conn.recv_into(buf):
                    pass
                conn.close()
        finally:
            os._exit(0)
    port = listener.getsockname()[1]
    listener.close()
    return port, pid


class GproxyCopy(tg.Gproxy):
    def command(self):
        return [self.python, "-c", NO_WALK, "-c", self.conf, "--log-level", "warn"]


class Callgrind(tg.Gproxy):
    def __init__(self, *args, out=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def command(self):
        return ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + self.out,
                "--dump-instr=no"] + super().command()


def one_run(target, size, per_send, total, port=None):
    """One connection's bytes through ``target`` (to ``port``, default its first
    listener): ``(proxy CPU s, wall s, bytes)``."""
    frame = mqttwire.publish(b"bench/oneway", b"x" * size)
    batch = frame * max(1, per_send // len(frame))
    with socket.create_connection((HOST, port or target.port), timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(mqttwire.connect(b"oneway-%d" % time.monotonic_ns()))
        time.sleep(0.2)  # the session is relaying
        cpu0, t0, sent = _cpu(target), time.monotonic(), 0
        while sent < total:
            sock.sendall(batch)
            sent += len(batch)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the proxy closes once the sink has read everything
        return _cpu(target) - cpu0, time.monotonic() - t0, sent


def _cpu(target):
    return procstat.tree_cpu_seconds(target.pid) if target.pid else 0.0


def _discard(listener):
    """A forked reader on ``listener`` (the order probe's sink socket) that reads every
    connection it accepts to its end until it is killed.  Not just the first: HAProxy
    and nginx connect to the sink as soon as a client reaches their order listener,
    the harness's own readiness probe included, so the backlog may hold such a closed
    connection ahead of this run's (a reader of one connection took that one, and the
    run waited out its 120 s timeout)."""
    pid = os.fork()
    if pid == 0:
        try:
            ready = selectors.DefaultSelector()
            ready.register(listener, selectors.EVENT_READ)
            buf = bytearray(1 << 18)
            while True:
                for key, _ in ready.select():
                    sock = key.fileobj
                    if sock is listener:
                        ready.register(listener.accept()[0], selectors.EVENT_READ)
                        continue
                    try:
                        more = sock.recv_into(buf)
                    except OSError:
                        more = 0
                    if not more:
                        ready.unregister(sock)
                        sock.close()
        finally:
            os._exit(0)
    return pid


def workload(target, broker, opts, prefix, size=16384, per_send=65536):
    """The main benchmark's **oneway16k**: ``opts.oneway_gb`` through the order listener."""
    reader = _discard(opts.sink.sock)
    try:
        cpu, wall, sent = one_run(target, size, per_send, opts.oneway_gb * 1e9,
                                  port=target.order_port)
    finally:
        os.kill(reader, signal.SIGTERM)
        os.waitpid(reader, 0)
    return {"oneway16k_MBps": sent / wall / 1e6,
            "oneway16k_cpu_s_per_GB": cpu / (sent / 1e9) if target.pid else None}


WORKLOADS = {"oneway16k": workload}


def make(name, run_dir, python, sink_port, out=None):
    own = os.path.abspath(python) == sys.executable
    if name == "haproxy":
        return tg.HAProxy(run_dir, tg.find("haproxy"), sink_port, 20000, sink_port)
    if name == "gproxy-copy":
        return GproxyCopy(run_dir, name, python, sink_port, sink_port, own_python=own)
    if out is not None:
        return Callgrind(run_dir, name, python, sink_port, sink_port, own_python=own, out=out)
    return tg.Gproxy(run_dir, name, python, sink_port, sink_port, own_python=own)


def measure(args):
    run_dir = tempfile.mkdtemp(prefix="gproxy-oneway-")
    port, sink_pid = sink()
    out = os.path.join(run_dir, "callgrind.out") if args.tool == "callgrind" else None
    found = {}
    started = []
    try:
        for name in args.targets:
            target = make(name, run_dir, args.python, port, out)
            target.start(timeout=120 if out else 20)
            started.append(target)
        for _ in range(args.repeat):
            for target in started:
                if out:
                    subprocess.run(["callgrind_control", "-z", str(target.pid)], check=True,
                                   stdout=subprocess.DEVNULL)
                cpu, wall, sent = one_run(target, args.size, args.send, args.gb * 1e9)
                row = {"s_per_GB": cpu / (sent / 1e9), "MBps": sent / wall / 1e6}
                if out:
                    subprocess.run(["callgrind_control", "-d", str(target.pid)], check=True,
                                   stdout=subprocess.DEVNULL)
                    row["instructions_per_MB"] = _dumped(out) / (sent / 1e6)
                found.setdefault(target.name, []).append(row)
    finally:
        for target in started:
            target.stop()
        os.kill(sink_pid, signal.SIGTERM)
        os.waitpid(sink_pid, 0)
        shutil.rmtree(run_dir, ignore_errors=True)
    return found


def _dumped(out):
    """Instructions in the newest callgrind dump next to ``out`` (one per run)."""
    folder, base = os.path.split(out)
    dumps = sorted((os.path.getmtime(os.path.join(folder, n)), n) for n in os.listdir(folder)
                   if n.startswith(base + "."))
    with open(os.path.join(folder, dumps[-1][1])) as fh:
        for line in fh:
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.oneway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="PUBLISH payload bytes")
    parser.add_argument("--send", type=int, default=65536, help="bytes per sendall")
    parser.add_argument("--gb", type=float, help="GB per run (default 1; quick 0.2)")
    parser.add_argument("--repeat", type=int, help="runs per target (default 5; quick 3)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--targets", default="haproxy,gproxy,gproxy-copy")
    parser.add_argument("--tool", choices=("none", "callgrind"), default="none")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter with gproxy installed (another build: its venv)")
    args = parser.parse_args(argv)
    args.gb = args.gb or (0.2 if args.quick else 1.0)
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.targets = [t for t in args.targets.split(",") if t]
    if args.tool == "callgrind" and set(args.targets) - {"gproxy"}:
        parser.error("--tool callgrind counts gproxy's instructions: --targets gproxy")
    found = measure(args)
    print("%d-byte PUBLISHes, %d bytes a send, %.2f GB a run, %d runs (medians):" % (
        args.size, args.send, args.gb, args.repeat))
    for name, rows in found.items():
        line = "  %-12s %7.3f s/GB  %7.0f MB/s" % (
            name, statistics.median(r["s_per_GB"] for r in rows),
            statistics.median(r["MBps"] for r in rows))
        if "instructions_per_MB" in rows[0]:
            line += "  %.0f instructions/MB" % statistics.median(
                r["instructions_per_MB"] for r in rows)
        print(line + "  (s/GB runs: %s)" % " ".join("%.3f" % r["s_per_GB"] for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
