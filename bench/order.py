"""Cross-connection order probe: does a later sender overtake an earlier one?

Two MQTT sessions go through the target to a recording sink (not the broker).
In each trial one session sends a PINGREQ, the sender busy-waits ``gap`` µs on
``perf_counter_ns`` and the other session sends one; the sink notes which of
the two reached it first.  The two sessions swap roles every trial, so a proxy
that serves its sockets in a fixed (fd or accept) order cannot look right by
accident.  The sink answers each PINGREQ with a PINGRESP and the sender waits
for both answers (and a short jittered pause) before the next trial, so trials
never overlap.

The sink is one process reading all its connections from one epoll; the
arrival time of each packet is the kernel's receive timestamp
(``SO_TIMESTAMPNS``: on loopback, the moment the proxy's ``send`` handed the
bytes over), so the sink's own wake-up delay does not blur the order.  The
epoll order is recorded too and used where the kernel gives no timestamp.
"""

import random
import select
import socket
import struct
import time
from array import array

from bench import loadgen, mqttwire
from bench.procstat import self_cpu_seconds
from bench.targets import HOST
from bench.workloads import _receive, _reap, _spawn, percentile

#: asm-generic SO_TIMESTAMPNS (x86-64, arm64, riscv...); Python has no constant.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@ll")
PAUSE_NS = 150_000  # between trials, plus up to as much again at random


class Sink:
    """The sink's listening socket, bound once for the whole benchmark.

    Proxies are configured with its port when they start; each probe run
    forks a sink process that accepts on it.
    """

    def __init__(self):
        self.sock = socket.socket()
        # Set here, long before the first probe: accepted sockets inherit it, and
        # the kernel turns receive timestamps on for everyone only some time
        # after the first socket asks (packets until then carry none).
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


def _read_connect(sock):
    """The client id of the CONNECT at the start of ``sock`` (MQTT 3.1.1 §3.1)."""
    head = loadgen.recv_exact(sock, 2)
    length, shift, byte = 0, 0, head[1]
    while True:
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        byte = loadgen.recv_exact(sock, 1)[0]
    body = loadgen.recv_exact(sock, length)
    name_len = struct.unpack_from("!H", body)[0]
    at = 2 + name_len + 4  # protocol name, level, flags, keep-alive
    id_len = struct.unpack_from("!H", body, at)[0]
    return body[at + 2:at + 2 + id_len]


def _accept(listener, ids, deadline):
    """The two sessions of this run, by index; strays (an earlier run's) are closed."""
    conns = {}
    while len(conns) < len(ids):
        listener.settimeout(max(0.01, deadline - time.monotonic()))
        sock, _ = listener.accept()
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            client_id = _read_connect(sock)
        except OSError:
            sock.close()
            continue
        if client_id not in ids:
            sock.close()
            continue
        sock.sendall(mqttwire.CONNACK_OK)
        conns[ids.index(client_id)] = sock
    return conns


def _stamp(ancdata):
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return -1


def sink_worker(pipe, listener, ids, expected, seconds):
    """Accept both sessions, then record every PINGREQ's arrival until ``expected`` each."""
    deadline = time.monotonic() + seconds
    stamps = [array("q") for _ in ids]  # kernel receive time, ns (-1: none)
    seqs = [array("q") for _ in ids]  # position in the sink's epoll order
    error, conns = None, {}
    try:
        conns = _accept(listener, ids, deadline)
        _record(conns, stamps, seqs, expected, deadline)
    except OSError as exc:
        error = "%s: %s" % (type(exc).__name__, exc)
    finally:
        for sock in conns.values():
            sock.close()
    pipe.send({"stamps": [a.tobytes() for a in stamps], "seqs": [a.tobytes() for a in seqs],
               "error": error})


def _record(conns, stamps, seqs, expected, deadline):
    ep = select.epoll()
    by_fd, got, seq = {}, [0] * len(conns), 0
    space = socket.CMSG_SPACE(_TIMESPEC.size)
    for i, sock in conns.items():
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        ep.register(sock.fileno(), select.EPOLLIN)
        by_fd[sock.fileno()] = i
    try:
        while min(len(s) for s in stamps) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("sink: %s of %d arrivals by the deadline" % (
                    [len(s) for s in stamps], expected))
            for fd, _ in ep.poll(min(left, 1.0)):
                i = by_fd[fd]
                data, anc, _, _ = conns[i].recvmsg(256, space)
                if not data:
                    raise ConnectionResetError("sink: session %d closed early" % i)
                seq += 1
                ts = _stamp(anc)
                # A PINGREQ is 2 bytes: one arrival per packet that starts here.
                for _ in range((got[i] + len(data) + 1) // 2 - (got[i] + 1) // 2):
                    stamps[i].append(ts)
                    seqs[i].append(seq)
                done = (got[i] + len(data)) // 2 - got[i] // 2
                got[i] += len(data)
                if done:
                    conns[i].sendall(mqttwire.PINGRESP * done)
    finally:
        ep.close()


def _spin_until(clock, t):
    while clock() < t:
        pass


def sender_worker(pipe, addr, ids, gaps_ns, trials, timeout, seed):
    """Trial k: session k%2 sends, busy-wait the gap, the other sends; wait for both."""
    socks = []
    rng = random.Random(seed)
    clock = time.perf_counter_ns
    actual = array("q")
    try:
        for client_id in ids:
            socks.append(loadgen.mqtt_session(addr, client_id, timeout))
        cpu0 = self_cpu_seconds()
        k = 0
        for gap in gaps_ns:
            for _ in range(trials):
                first, second = socks[k % 2], socks[1 - k % 2]
                t0 = clock()
                first.send(mqttwire.PINGREQ)
                _spin_until(clock, t0 + gap)  # sleep(2) is far too coarse for 30 µs
                t1 = clock()
                second.send(mqttwire.PINGREQ)
                actual.append(t1 - t0)
                for sock in (first, second):
                    if loadgen.recv_exact(sock, 2) != mqttwire.PINGRESP:
                        raise ConnectionError("bad PINGRESP")
                _spin_until(clock, clock() + PAUSE_NS + rng.randrange(PAUSE_NS))
                k += 1
        result = {"gaps": actual.tobytes(), "cpu": self_cpu_seconds() - cpu0}
    except OSError as exc:
        result = {"gaps": actual.tobytes(), "error": "%s: %s" % (type(exc).__name__, exc)}
    for sock in socks:
        try:
            sock.sendall(mqttwire.DISCONNECT)
        except OSError:
            pass
        sock.close()
    pipe.send(result)


def order_probe(target, broker, opts, prefix):
    """Swap rate per gap: % of trials in which the later sender reached the sink first."""
    ids = [prefix + b"o0", prefix + b"o1"]
    gaps, trials = opts.order_gaps, opts.order_trials
    budget = sum(gaps) * 1e-6 * trials + len(gaps) * trials * 0.003 + opts.timeout + 5
    sink = _spawn(sink_worker, opts.sink.sock, ids, len(gaps) * trials, budget)
    sender = _spawn(sender_worker, (HOST, target.order_port), ids,
                    [g * 1000 for g in gaps], trials, opts.timeout, hash(prefix))
    try:
        deadline = time.monotonic() + budget + 5
        sent = _receive(sender[1], deadline)
        seen = _receive(sink[1], deadline)
    finally:
        _reap([sender, sink])
    if not sent or not seen or sent.get("error") or seen.get("error"):
        raise RuntimeError("order probe failed: sender %s, sink %s" % (
            sent and sent.get("error"), seen and seen.get("error")))
    return reduce(gaps, trials, sent, seen)


def _array(raw):
    a = array("q")
    a.frombytes(raw)
    return a


def reduce(gaps, trials, sent, seen):
    stamps = [_array(r) for r in seen["stamps"]]
    seqs = [_array(r) for r in seen["seqs"]]
    actual = _array(sent["gaps"])
    out = {"order_trials": trials, "order_disagree": 0, "order_sender_cpu_s": sent["cpu"],
           "order_unstamped": sum(1 for s in stamps for ts in s if ts < 0)}
    for n, gap in enumerate(gaps):
        swaps = 0
        for k in range(n * trials, (n + 1) * trials):
            a, b = k % 2, 1 - k % 2  # a sent first
            by_seq = seqs[b][k] < seqs[a][k]
            if stamps[a][k] >= 0 and stamps[b][k] >= 0 and stamps[a][k] != stamps[b][k]:
                swapped = stamps[b][k] < stamps[a][k]
                out["order_disagree"] += swapped != by_seq
            else:
                swapped = by_seq
            swaps += swapped
        out["order_swap_pct_%dus" % gap] = 100.0 * swaps / trials
        sent_gaps = sorted(actual[n * trials:(n + 1) * trials])
        out["order_gap_p50_us_%dus" % gap] = percentile(sent_gaps, 50) / 1000.0
    return out


WORKLOADS = {"order": order_probe}
