"""Garbage collection in gproxy's own processes: keep live sessions out of the collector.

A full (generation 2) collection walks every object the cyclic collector
tracks, on the hub, in one go.  Live sessions are long-lived: a dozen tracked
objects each (session, record, relay, directions, watchers...), so at 9,000
sessions one full pass held the hub 50-80 ms, and it grows with every session.

Sessions hold no reference cycles (``tests/integration/test_gc.py``): each
session's objects are freed by their reference counts when it ends, not by
the collector.  So once a second this process collects what is not frozen
yet (start-up's objects the first time, then what survived since the last
round) and freezes the survivors (``gc.freeze``): the collector never looks
at them again, automatic passes walk only what is young, and a frozen object
that dies is still freed at once by its count.  What a round costs is what
the last second left alive, not how many sessions there are.

A frozen object that ends up in a reference cycle is never freed: that is
why the sessions' own test matters.  Only the CLI and its workers do this,
never a program that embeds gproxy (the collector is that program's).
"""

import gc

import gevent

INTERVAL = 1.0  # seconds between rounds


def freeze_survivors():
    """Collect what is not frozen yet, then freeze what is left of it."""
    gc.collect()
    gc.freeze()


def start(interval=INTERVAL):
    """Freeze what start-up built, then freeze survivors every ``interval`` s."""
    freeze_survivors()
    return gevent.spawn(_rounds, interval)


def _rounds(interval):
    while True:
        gevent.sleep(interval)
        freeze_survivors()
