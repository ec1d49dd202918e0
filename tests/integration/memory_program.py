"""What a live idle session holds in gproxy (run by test_memory.py as a child).

    python memory_program.py BROKER_PORT STORE_DIR SESSIONS

gproxy runs embedded in this process.  After a warm-up, tracemalloc watches
while SESSIONS MQTT sessions open one after another and stay idle; the
allocations made under gproxy's code (the clients' own objects are left out)
are divided by SESSIONS.  Also counted: ``Session`` objects still alive
(none should be: a relaying session is its ``RelayedSession``) and what the
registry holds as each live session's handle.  Prints one JSON report.
"""

import collections
import gc
import json
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.integration.gc_program import connected, start_proxy, wait_quiet  # noqa: E402

CONNACK = b"\x20\x02\x00\x00"


def open_session(port, client_id):
    sock, got = connected(port, client_id)
    assert got == CONNACK, got
    return sock


def gproxy_bytes(snapshot):
    """Bytes allocated with gproxy's code on the stack (not the test's clients)."""
    mine = snapshot.filter_traces([tracemalloc.Filter(True, "*/gproxy/*", all_frames=True)])
    return sum(stat.size for stat in mine.statistics("filename"))


def main(broker_port, store_dir, count):
    proxy, port = start_proxy(broker_port, store_dir)
    try:
        for i in range(20):  # warm up: one-time caches, pools, lazily built objects
            open_session(port, b"warm-%d" % i).close()
        wait_quiet(proxy)
        tracemalloc.start(30)
        before = gproxy_bytes(tracemalloc.take_snapshot())
        socks = [open_session(port, b"idle-%06d" % i) for i in range(count)]
        time.sleep(0.5)  # the last relays have started
        after = gproxy_bytes(tracemalloc.take_snapshot())
        tracemalloc.stop()
        kinds = collections.Counter(type(o).__name__ for o in gc.get_objects())
        registry = proxy._app.proxy.registry
        handles = collections.Counter(type(registry.handle(sid)).__name__
                                      for sid in registry.ids())
        print(json.dumps({"sessions": count, "live": proxy.stats()["live_sessions"],
                          "bytes_per_session": (after - before) / count,
                          "session_objects": kinds["Session"], "handles": handles}))
        for sock in socks:
            sock.close()
    finally:
        proxy.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
