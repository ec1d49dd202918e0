"""The ``gproxy-embedded`` bench target: gproxy started with ``gproxy.start`` from a
plain (never monkey-patched) program, as docs/embedding.md shows.

    python -m bench.embedded CONFIG

Runs until SIGTERM/SIGINT, then stops gproxy the way the handle does.  Logging
and the fd limit are set as the ``gproxy`` command sets them, so the only
difference the bench sees is the embedding: a hub in a background thread of an
unpatched interpreter, blocking work in its threadpool.
"""

import signal
import sys
import threading

import gproxy
from gproxy.cli import raise_fd_limit, setup_logging


def main(path):
    setup_logging("warn")
    raise_fd_limit()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with gproxy.start(path):
        while not stop.wait(1.0):  # the main thread idles as a host program would
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
