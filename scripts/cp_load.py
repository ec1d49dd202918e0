"""The control-plane benchmark's load: Admin clients, relaying sessions, new clients, etcd.

Runs in the benchmark's own plain (unpatched) process, with threads:

* ``Admin``: one keep-alive HTTP connection per thread to gproxy's Admin API,
  each request timed from send to the end of the answer;
* ``bulk``: many objects through ``Admin`` clients in parallel (writes/s,
  latencies, statuses);
* ``PingLoad``: PINGREQs sent round robin over the idle sessions at a rate,
  each PINGRESP awaited: the sessions keep relaying (through gproxy, to the
  brokers and back) while the control plane works, and their round trips are
  timed;
* ``Connacks``: new clients one at a time at a rate, CONNECT to CONNACK timed;
* ``EtcdWriter``: keys put straight into etcd's JSON gateway (128 per txn), as
  another instance or ``etcdctl`` would: gproxy sees them as watch events.
"""

import base64
import http.client
import json
import socket
import threading
import time
import urllib.request

from scale_setup import HOST, KEY, connack_latencies, recv_exact

from bench import mqttwire


class Admin:
    """One Admin API connection (keep-alive), reopened after an error."""

    def __init__(self, port, timeout=30):
        self.port, self.timeout = port, timeout
        self.conn = None

    def call(self, method, path, body=None, raw=None):
        """``(status, seconds, body text)``; status 0 when no answer came."""
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        start = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            self.conn.request(method, "/apisix/admin" + path, body=data,
                              headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
            resp = self.conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            return resp.status, time.perf_counter() - start, text
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return 0, time.perf_counter() - start, str(exc)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def bulk(port, requests, clients):
    """Send ``requests`` (``(method, path, body)``) over ``clients`` connections.

    Returns ``{"seconds", "latencies", "statuses"}``.
    """
    jobs = list(reversed(requests))
    lock = threading.Lock()
    latencies, statuses = [], {}

    def work():
        admin = Admin(port)
        while True:
            with lock:
                if not jobs:
                    break
                method, path, body = jobs.pop()
            status, took, _ = admin.call(method, path, body)
            with lock:
                latencies.append(took)
                statuses[status] = statuses.get(status, 0) + 1
        admin.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - start, "latencies": latencies,
            "statuses": statuses}


class Background(threading.Thread):
    """A measuring loop in a thread until ``stop()``; ``take()`` returns what it saw."""

    def __init__(self):
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.samples = []

    def take(self):
        with self.lock:
            out, self.samples = self.samples, []
        return out

    def stop(self):
        self.done.set()
        self.join(30)


class PingLoad(Background):
    """PINGREQ -> PINGRESP over the idle sessions, ``rate`` a second, round robin."""

    def __init__(self, socks, rate):
        super().__init__()
        self.socks, self.rate = socks, rate
        self.failures = 0

    def run(self):
        n, start = 0, time.monotonic()
        while not self.done.is_set():
            due = start + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sock = self.socks[n % len(self.socks)]
            n += 1
            sent = time.perf_counter()
            try:
                sock.sendall(mqttwire.PINGREQ)
                if recv_exact(sock, 2) != mqttwire.PINGRESP:
                    raise RuntimeError("not a PINGRESP")
            except (OSError, RuntimeError):
                self.failures += 1
                continue
            with self.lock:
                self.samples.append(time.perf_counter() - sent)


class Connacks(Background):
    """New clients through gproxy, ``rate`` a second: connect -> CONNACK in seconds."""

    def __init__(self, port, rate):
        super().__init__()
        self.port, self.rate = port, rate
        self.next_id = 0

    def run(self):
        while not self.done.is_set():
            try:
                got = connack_latencies(self.port, 0.5, self.rate, self.next_id)
            except (OSError, RuntimeError):
                got = [10000.0]  # no CONNACK within the clients' 10 s timeout
            self.next_id += len(got) + 1
            with self.lock:
                self.samples.extend(ms / 1000 for ms in got)


def b64(text):
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()


class EtcdWriter:
    """Puts straight into etcd (its v3 JSON gateway), as another writer would."""

    def __init__(self, url, prefix="/apisix"):
        self.url, self.prefix = url, prefix

    def _post(self, path, payload):
        req = urllib.request.Request(self.url + "/v3" + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def put(self, kind, id_, text):
        """One key; ``text`` is the value as stored (JSON, or anything hostile)."""
        key = "%s/%s/%s" % (self.prefix, kind, id_)
        return self._post("/kv/put", {"key": b64(key), "value": b64(text)})

    def put_many(self, items):
        """``(kind, id, value)`` items, 128 to a transaction (etcd's default cap)."""
        for start in range(0, len(items), 128):
            ops = [{"requestPut": {"key": b64("%s/%s/%s" % (self.prefix, kind, id_)),
                                   "value": b64(json.dumps(value))}}
                   for kind, id_, value in items[start:start + 128]]
            self._post("/kv/txn", {"success": ops})


def wait_listed(port, kind, count, timeout):
    """Wait until the Admin API lists ``count`` objects of ``kind``; seconds it took."""
    start = time.monotonic()
    admin = Admin(port)
    while time.monotonic() - start < timeout:
        status, _, text = admin.call("GET", "/%s?page=1&page_size=10" % kind)
        if status == 200 and json.loads(text)["total"] >= count:
            admin.close()
            return time.monotonic() - start
        time.sleep(0.2)
    admin.close()
    return None


def idle_flood(port, count):
    """``count`` TCP connections to the admin port that never send a byte."""
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection((HOST, port), timeout=5))
        except OSError:
            break
    return socks
