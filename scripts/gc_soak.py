#!/usr/bin/env python3
"""Does freezing survivors leak?  Long churn of every kind of session, counted.

    .venv/bin/python scripts/gc_soak.py               # 180 s of churn
    .venv/bin/python scripts/gc_soak.py --seconds 30  # a short look

gproxy's CLI freezes what survived each collection round
(gproxy/runtime/gcpolicy.py): an object frozen while alive that later ends
up in a reference cycle is never collected.  Sessions hold no cycles
(tests/integration/test_gc.py), but everything else on the hub is frozen
too.  This runs gproxy (scale_setup.py's child, which writes a census every
2 s: ``gc.get_freeze_count()``, the objects the collector still tracks, RSS)
with a plain and a TLS listener and the Admin API, and keeps churning:
plain MQTT sessions, MQTT over TLS and over WebSocket, refused ones (a wrong
protocol level, garbage, a client that leaves before its CONNECT), a pool of
held sessions evicted through the Admin API and opened again, Admin API
reads and route writes.  The number of live sessions stays about the same
throughout, so a frozen count or an RSS that keeps climbing is a leak: the
report gives both over the second half of the run, per minute.  At the end,
with every session closed, everything is unfrozen and collected once: what
that finds is the cyclic garbage freezing had kept (the leak itself, by kind).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_setup import (HOST, KEY, finish, free_port, mqttwire, start_broker,  # noqa: E402
                         wait_port)
from bench import tlsbench  # noqa: E402  (scale_setup put the repo on the path)
from bench.loadgen import mqtt_session  # noqa: E402

HELD = 30  # sessions held, evicted and opened again every few seconds


ROUTE = {}


def config(workdir, broker, pki):
    stream, tls_port, admin = free_port(), free_port(), free_port()
    route = {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}},
             "upstream": {"type": "chash", "key": "mqtt_client_id",
                          "nodes": [{"host": HOST, "port": broker, "weight": 1}]}}
    ROUTE.update(route)
    ssl_obj = {"id": "1", "snis": [pki.sni], "cert": pki.cert_pem, "key": pki.key_pem}
    with open(os.path.join(workdir, "apisix.yaml"), "w") as fh:
        fh.write("stream_routes:\n  - %s\n  - %s\nssls:\n  - %s\nupstreams: []\n#END\n" % (
            json.dumps(dict(route, id="plain", server_port=stream)),
            json.dumps(dict(route, id="tls", server_port=tls_port)), json.dumps(ssl_obj)))
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as fh:
        json.dump({"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, stream), {
            "addr": "%s:%d" % (HOST, tls_port), "tls": True}]}},
            "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": admin},
                                     "admin_key": [{"name": "admin", "key": KEY,
                                                    "role": "admin"}]}}}, fh)
    return path, stream, tls_port, admin


def admin(port, method, path, body=None):
    req = urllib.request.Request("http://%s:%d/apisix/admin%s" % (HOST, port, path),
                                 method=method, headers={"X-API-KEY": KEY},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def refused(port, payload):
    """A client gproxy turns away: what it sends, then wait for gproxy to close."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        if payload:
            sock.sendall(payload)
            sock.recv(16)  # gproxy closes (or resets)


def one_round(n, ports, pki, held):
    """Once around every kind of churn; ``held`` is replaced when evicted."""
    stream, tls_port, admin_port = ports
    for i in range(5):
        sock = mqtt_session((HOST, stream), b"plain-%d-%d" % (n, i), 10)
        sock.sendall(mqttwire.publish(b"soak/t", b"x" * 100) + mqttwire.DISCONNECT)
        sock.close()
    mqtt_session((HOST, tls_port), b"tls-%d" % n, 10, tls=pki.client).close()
    ws = mqtt_session((HOST, stream), b"ws-%d" % n, 10, ws=True)
    ws.sendall(mqttwire.DISCONNECT)
    ws.close()
    level5 = bytearray(mqttwire.connect(b"level5-%d" % n))
    level5[8] = 5  # MQTT 5: the route takes level 4 only
    refused(stream, bytes(level5))
    refused(stream, b"\x10\xff\xff\xff\xff\xff")  # a remaining length that never ends
    refused(stream, b"")  # closes before its CONNECT
    if n % 20 == 0:  # about every 2 s: evict the held sessions, open them again
        admin(admin_port, "DELETE", "/gproxy/sessions?client_id=held-")
        for sock in held:
            sock.close()
        held[:] = [mqtt_session((HOST, tls_port if i % 3 == 0 else stream),
                                b"held-%d-%d" % (n, i), 10, ws=i % 3 == 1,
                                tls=pki.client if i % 3 == 0 else None) for i in range(HELD)]
    admin(admin_port, "GET", "/gproxy/sessions?page=1&page_size=50&sort=connected_at")
    admin(admin_port, "GET", "/gproxy/stats")
    if n % 50 == 0:  # a store write: a new route table for new sessions
        admin(admin_port, "PUT", "/stream_routes/plain", dict(ROUTE, server_port=stream,
                                                              desc="soak %d" % n))


def census(path, since):
    rows = []
    with open(path) as fh:
        for line in fh:
            at, frozen, tracked, rss, _ = line.split()
            if float(at) >= since:
                rows.append((float(at), int(frozen), int(tracked), int(rss)))
    return rows


def slope(rows, index):
    """Least-squares growth per minute of column ``index`` over time."""
    n = len(rows)
    if n < 2:
        return 0.0
    mt = sum(r[0] for r in rows) / n
    mv = sum(r[index] for r in rows) / n
    var = sum((r[0] - mt) ** 2 for r in rows)
    return 60 * sum((r[0] - mt) * (r[index] - mv) for r in rows) / var if var else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="gproxy-gcsoak-")
    procs, held = [], []
    try:
        broker_proc, broker = start_broker(workdir, "a")
        procs.append(broker_proc)
        pki = tlsbench.Pki(workdir)
        path, stream, tls_port, admin_port = config(workdir, broker, pki)
        probe = os.path.join(workdir, "probe.log")
        open(probe, "w").close()
        log = open(os.path.join(workdir, "gproxy.log"), "wb")
        gp = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(
            os.path.abspath(__file__)), "scale_setup.py"), path, probe], cwd=workdir,
            stdout=log, stderr=log, env=dict(os.environ, GPROXY_CENSUS="2"))
        procs.append(gp)
        for port in (admin_port, stream, tls_port):
            wait_port(port, gp, 60)
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < args.seconds:
            one_round(n, (stream, tls_port, admin_port), pki, held)
            n += 1
        ended = time.time()
        for sock in held:
            sock.close()
        held = []
        time.sleep(2.5)  # the last census
        open(probe + ".unfreeze", "w").close()  # now: unfreeze everything and collect
        deadline = time.monotonic() + 30
        while not os.path.exists(probe + ".unfrozen") and time.monotonic() < deadline:
            time.sleep(0.2)
        with open(probe + ".unfrozen") as fh:
            unfrozen = json.load(fh)
        rows = census(probe + ".census", ended - args.seconds / 2)
        first, last = rows[0], rows[-1]
        print("%d rounds of churn in %.0f s (about %d sessions)" % (n, args.seconds, n * 10))
        print("second half: frozen objects %d -> %d (%+.0f a minute), tracked not frozen "
              "%d -> %d, RSS %.1f -> %.1f MiB (%+.2f MiB a minute)" % (
                  first[1], last[1], slope(rows, 1), first[2], last[2], first[3] / 1024,
                  last[3] / 1024, slope(rows, 3) / 1024))
        kinds = ", ".join("%s %d" % tuple(kv) for kv in unfrozen["kinds"]) or "none"
        print("then, every session ended: unfreezing everything and collecting found %d "
              "objects of cyclic garbage that freezing had kept: %s" % (
                  unfrozen["collected"], kinds))
        return 0
    finally:
        for sock in held:
            sock.close()
        finish(reversed(procs), workdir, False, None)


if __name__ == "__main__":
    sys.exit(main())
