"""Loopback ports: pick a free one for a listener, count who listens on one (/proc).

Only binds probe sockets (closed at once) and reads /proc/net; starts nothing.
"""

import random
import socket

HOST = "127.0.0.1"


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(v) for v in fh.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port():
    """A loopback port nothing uses now, below the ephemeral range where there is room.

    ``bind(0)`` hands out ports from ``ip_local_port_range``, the range every
    outgoing connection on the machine takes its local port from; with the load
    generator's thousands of connections (and their TIME_WAITs) and other users
    of the box, such a port was often taken again by the time a target bound it
    (nginx once missed a whole round).  A random port below that range is
    only ever taken by someone binding it on purpose.  Checked by binding
    without SO_REUSEADDR, which also refuses a port a TIME_WAIT still holds.
    """
    low = _ephemeral_range()[0]
    for _ in range(100 if low > 11024 else 0):
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port):
    """How many sockets on this host are in LISTEN on ``port`` (from /proc/net/tcp).

    SO_REUSEPORT workers each show up as one.
    """
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 3 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count
