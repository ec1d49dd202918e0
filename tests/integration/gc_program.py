"""Sessions leave no cyclic garbage (run by test_gc.py as a child).

    python gc_program.py BROKER_PORT STORE_DIR SESSIONS

gproxy runs embedded in this process, so the collector sees its objects.
With automatic collection off, SESSIONS sessions run through it to the broker
and end in the ways sessions end (the client's DISCONNECT and close, a reset,
the proxy ending them cleanly, the idle timeout; a quarter as many more are
refused in their phases); then one collection must
find nothing unreachable: every per-session object was freed by its reference
count.  That is what lets the CLI freeze live sessions out of the collector's
way (gproxy/runtime/gcpolicy.py): a frozen object in a cycle would never be
freed.  Prints one JSON report.
"""

import collections
import gc
import json
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gproxy  # noqa: E402
from tests import packets  # noqa: E402
from tests.integration.embedded_program import HOST, free_port  # noqa: E402


def refused(port, client_id):
    """A client the route refuses (MQTT 5.0 where it wants 3.1.1): gproxy closes it."""
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.sendall(packets.connect_v5(client_id))
    while sock.recv(4096):
        pass
    sock.close()


def connected(port, client_id, keep_alive=0):
    """A client through gproxy that sent its CONNECT: ``(socket, the 4 CONNACK bytes)``."""
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.sendall(packets.connect_v311(client_id, keepalive=keep_alive))
    got = b""
    while len(got) < 4:
        chunk = sock.recv(4 - len(got))
        if not chunk:
            raise RuntimeError("no CONNACK for %r" % client_id)
        got += chunk
    return sock, got


def session(port, client_id, how, keep_alive=0):
    sock, _ = connected(port, client_id, keep_alive)
    sock.sendall(packets.publish("gc/t", b"p" * 3000) + packets.pingreq())
    if how == "disconnect":
        sock.sendall(packets.disconnect(4))
        sock.close()
    elif how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return sock


def wait_quiet(proxy, timeout=20):
    deadline = time.monotonic() + timeout
    while proxy.stats()["live_sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return proxy.stats()["live_sessions"]


def start_proxy(broker_port, store_dir):
    """gproxy embedded here (``mode="thread"``: not in a child process, or the
    collection and the census below would find nothing of it), one chash
    mqtt-proxy route to the broker: (proxy, port)."""
    with open(os.path.join(store_dir, "apisix.yaml"), "w") as fh:
        fh.write("stream_routes:\n  - id: 1\n    plugins:\n      mqtt-proxy:\n"
                 "        protocol_name: MQTT\n        protocol_level: 4\n    upstream:\n"
                 "      type: chash\n      key: mqtt_client_id\n      nodes:\n"
                 "        - {host: %s, port: %d, weight: 1}\n#END\n" % (HOST, broker_port))
    port = free_port()
    proxy = gproxy.start({"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]},
                                     "enable_control": False},
                          "plugin_attr": {"prometheus": {"enable_export_server": False}},
                          "deployment": {"admin": False},
                          "gproxy": {"store": {"path": os.path.join(store_dir, "apisix.yaml")},
                                     "evict": {"grace": 2}}},
                         mode="thread")  # here, where this process's collector sees it
    return proxy, port


def main(broker_port, store_dir, count):
    proxy, port = start_proxy(broker_port, store_dir)
    try:
        for i in range(20):  # warm up: one-time caches, pools, lazily built objects
            session(port, b"warm-%d" % i, "disconnect")
        wait_quiet(proxy)
        gc.disable()
        gc.collect()
        held = []
        for i in range(count):
            how = ("disconnect", "reset", "evict", "idle")[i % 4]
            sock = session(port, b"gc-%d" % i, how, keep_alive=1 if how == "idle" else 0)
            if how in ("evict", "idle"):
                held.append(sock)
            if i % 4 == 0:  # and sessions refused in their phases (they keep their Reject)
                refused(port, b"gc-refused-%d" % i)
        live = proxy.stats()["live_sessions"]
        # the relays are this process's objects (else nothing below would be checked)
        relays_seen = sum(type(o).__name__ == "RelayedSession" for o in gc.get_objects())
        time.sleep(2.5)  # keep alive 1 s: the idle timeout (1.5 s) ends those
        proxy.admin("DELETE", "/apisix/admin/gproxy/sessions", query={"client_id": "gc-"})
        left = wait_quiet(proxy)
        for sock in held:
            sock.close()
        gc.set_debug(gc.DEBUG_SAVEALL)
        unreachable = gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
        gc.set_debug(0)
        del gc.garbage[:]
        print(json.dumps({"sessions": count, "live_before_end": live, "left": left,
                          "relays_seen": relays_seen,
                          "unreachable": unreachable, "kinds": kinds.most_common(12),
                          "total": proxy.stats()["sessions_total"]}))
    finally:
        proxy.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
