"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram to $NOTIFY_SOCKET.

``notify("READY=1")`` when gproxy serves; a live upgrade says ``RELOADING=1``
in the old process and ``MAINPID=<new pid>`` + ``READY=1`` from the new one,
so a ``Type=notify`` unit with ``NotifyAccess=all`` follows the new main
process (docs/deploy.md).  Without $NOTIFY_SOCKET (not under systemd) every
call does nothing; a failed send is logged, never raised: systemd's view of
the service must not decide whether sessions move.
"""

import logging
import os
import socket
import time

log = logging.getLogger("gproxy.server")


def notify(*fields):
    """Send ``fields`` (``"READY=1"``...) as one message; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # the abstract namespace (sd_notify(3))
        address = "\0" + address[1:]
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.error("sd_notify to %s failed: %s", address.lstrip("\0"), exc.strerror or exc)
        return False
    return True


def reloading():
    """The old process starts a live upgrade (systemd >= 253 wants the clock too)."""
    return notify("RELOADING=1", "MONOTONIC_USEC=%d" % (time.clock_gettime_ns(
        time.CLOCK_MONOTONIC) // 1000), "STATUS=live upgrade: handing sessions over")


def new_main(pid=None):
    """The new process has every session: it is the service's main process now."""
    return notify("MAINPID=%d" % (pid or os.getpid()), "READY=1",
                  "STATUS=serving (took over from a live upgrade)")
