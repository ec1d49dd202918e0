"""Blocking calls made without holding the hub: gevent's threadpool.

A store's file and network work (fsync, reads, etcd requests) must not stall
the hub that relays every session; the caller waits cooperatively instead.
"""

import gevent


def in_threadpool(func, *args):
    """``func(*args)`` in the hub's threadpool; its result or exception comes back here.

    The exception is carried back rather than left to the pool thread, where
    gevent would print it as a traceback.
    """
    def run():
        try:
            return True, func(*args)
        except Exception as exc:  # raised again in the caller, below
            return False, exc
    ok, result = gevent.get_hub().threadpool.apply(run)
    if not ok:
        raise result
    return result
