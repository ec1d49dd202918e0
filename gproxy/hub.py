"""Helpers for code that shares the hub with the data path.

Outside the package layers, like ``errors``: the Admin API, the sessions
view, the workers' control channel, the etcd client, embedding and the
relay's idle sweeper all use them.
"""

import socket
import time

import gevent

YIELD_EVERY = 0.001  # seconds of admin work before the data path gets the hub back
_last_yield = [0.0]


def pause(budget=YIELD_EVERY):
    """Let the data path run if admin work has held the hub for ``budget`` seconds.

    ``gevent.sleep(0)`` would not do: it only queues a callback, and the hub
    runs queued callbacks back to back (checking the clock every 50), so a
    walk over 10,000 sessions that "yields" 40 times that way still holds the
    hub for its whole length.  A short timer makes the loop poll sockets and
    run timers before the walk goes on.
    """
    now = time.perf_counter()
    if now - _last_yield[0] >= budget:
        gevent.sleep(0.0001)
        _last_yield[0] = time.perf_counter()


def monkey_patched():
    """True in a monkey-patched program (checked without importing gevent.monkey)."""
    return socket.socket.__module__.startswith("gevent")
