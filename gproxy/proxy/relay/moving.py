"""A relay's own part in moving to another process: quiesce, restart, release, load.

``relay.handoff`` (the only caller) writes a live relay's state out of one
process and reads it back in another (live upgrade, rebalancing workers).
This is what that asks of the relay (docs/upgrade.md, "What the relay owes
the handover"), apart from each direction's ``export``/``restore``
(direction.py):

* ``quiesce``: every watcher stopped and out of the idle sweeper; records
  still in the event queue find ``reason`` set and do nothing.  Then the
  directions' ``export`` empties the splice pipes into their backlogs and
  folds every mode (BODY, WALK, ALL) back to COPY, so what is left of the
  relay is bytes, flags and the packet-boundary trackers;
* ``restart``: the handover failed: run on here from that state (backlogs
  first, the next read choosing the mode again);
* ``release``: another process runs the session now: the kernel sockets
  leave the hub's epoll set (``forget_fd``), this process's descriptors,
  pipes and watchers are closed without a FIN, and the directions let go of
  the relay, so no reference cycle keeps the moved session in memory (the
  CLI freezes live sessions out of the cyclic collector: a cycle left here
  would never be freed, and a worker that gives sessions away lives on);
* ``load``: in the new process, a relay built for the handed session takes
  up the idle clock and each direction's backlog and end (``handoff``
  loads the trackers).

``Moving`` is a part of ``Relay`` (relay.py), kept apart by concern as
``Splicing`` is: its methods use the relay's own and hold no state.
"""

import ctypes

from gproxy.proxy.relay.direction import RawEndpoint

MOVING = "moving"  # a quiesced relay's ``reason``


class Moving:
    """The handover's half of ``Relay``."""

    __slots__ = ()

    def quiesce(self):
        """Stop every watcher and leave the sweeper: nothing moves until
        ``restart`` or ``release``."""
        self.hub.leave(self)
        self.reason = MOVING
        for d in (self.up, self.down):
            d.reader.stop()
            if d.writer is not None:
                d.writer.stop()

    def restart(self):
        """Run a quiesced relay again (its handover failed)."""
        self.reason = None
        self.start()

    def release(self):
        """Forget a quiesced relay another process runs now (see the module docstring)."""
        loop = self.hub.loop
        socks = [s for s in (self.client, self.upstream) if isinstance(s, RawEndpoint)]
        for sock in socks:
            forget_fd(loop, sock.fileno())
        for d in (self.up, self.down):
            d.close()  # watchers, pipe, and the direction's reference to this relay
        for sock in socks:
            sock.close()
        self.on_done = None  # it never finishes here

    def load(self, last, up, down):
        """Take up a handed relay's state: ``last`` (CLOCK_MONOTONIC is system-wide,
        so the idle clock goes on), each direction's ``(backlog, done)``."""
        self.last = last
        self.up.restore(*up)
        self.down.restore(*down)


def forget_fd(loop, fd):
    """Take ``fd`` out of the hub's epoll set before closing a descriptor that
    another process still holds (a handed session).

    epoll watches open file descriptions, not descriptor numbers: closing our
    number while the other process keeps the socket open would leave it in
    the set (libev never deletes, it waits for the close), so every byte for
    that session would wake this hub.  A stopped watcher and an explicit
    EPOLL_CTL_DEL on the loop's epoll descriptor fix it.
    """
    if _epoll_ctl is not None and getattr(loop, "backend", None) == "epoll":
        _epoll_ctl(loop.fileno(), _EPOLL_CTL_DEL, fd, None)  # ENOENT: never there


def _libc_epoll_ctl():
    try:
        func = ctypes.CDLL(None, use_errno=True).epoll_ctl
    except (OSError, AttributeError):
        return None  # not Linux: libuv or another libev backend, nothing to undo
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    return func


_EPOLL_CTL_DEL = 2
_epoll_ctl = _libc_epoll_ctl()
