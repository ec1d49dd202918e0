"""The registry: live sessions as metadata records, plus running totals.

A session is a ``SessionInfo`` (ids, addresses, route, node, byte counts,
timestamps); the table never holds a socket.  To let an operator disconnect a
session, its owner registers a *closer* callable next to the record.
``snapshot()`` and ``stats()`` return plain JSON-ready dicts so several worker
processes can each report theirs and a parent can merge them.  Pure: no I/O.
"""

import itertools
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass
class SessionInfo:
    """One client connection, from accept to close. Never holds credentials."""

    id: str
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int
    route_id: str = None
    client_id: str = None
    protocol_level: int = None
    node: str = None
    bytes_in: int = 0   # client -> broker
    bytes_out: int = 0  # broker -> client
    connected_at: float = field(default_factory=time.time)
    state: str = "preread"

    @property
    def seq(self):
        """The per-process connection number, nginx's ``*<n>`` in log lines."""
        return self.id.rpartition("-")[2]

    def as_dict(self):
        return asdict(self)


class Registry:
    """Live sessions and totals of one process."""

    def __init__(self, worker=None):
        prefix = "%s-" % (worker if worker is not None else os.getpid())
        self._ids = (prefix + str(n) for n in itertools.count(1))
        self._live = {}
        self._closers = {}
        self.started_at = time.time()
        self.sessions_total = 0
        self.rejected = Counter()
        self.bytes_in_closed = 0
        self.bytes_out_closed = 0

    def new_session(self, client, server):
        """A fresh SessionInfo for a client ``(ip, port)`` on a listener ``(ip, port)``."""
        return SessionInfo(next(self._ids), client[0], client[1], server[0], server[1])

    def add(self, info, closer=None):
        """Show ``info`` as live; ``closer()`` is how an operator may end it."""
        self._live[info.id] = info
        if closer is not None:
            self._closers[info.id] = closer
        self.sessions_total += 1

    def remove(self, info):
        """The session has ended: fold its bytes into the totals."""
        if self._live.pop(info.id, None) is None:
            return
        self._closers.pop(info.id, None)
        self.bytes_in_closed += info.bytes_in
        self.bytes_out_closed += info.bytes_out

    @contextmanager
    def track(self, info, closer=None):
        """Show ``info`` as live for the duration of the ``with`` block."""
        self.add(info, closer)
        try:
            yield info
        finally:
            self.remove(info)

    def reject(self, reason):
        """Count a connection refused before proxying (``reason`` is a short token)."""
        self.rejected[reason] += 1

    def get(self, session_id):
        return self._live.get(session_id)

    def close(self, session_id):
        """Ask a live session to end; True if it was known and closable."""
        closer = self._closers.get(session_id)
        if closer is None:
            return False
        closer()
        return True

    def close_where(self, route_id=None):
        """Close every live session (of one route, if given); returns the ids closed."""
        ids = [sid for sid, info in list(self._live.items())
               if route_id is None or info.route_id == str(route_id)]
        return [sid for sid in ids if self.close(sid)]

    def __len__(self):
        return len(self._live)

    def snapshot(self):
        """Live sessions as plain dicts, oldest first."""
        return [info.as_dict() for info in list(self._live.values())]

    def stats(self):
        live = list(self._live.values())
        per_node = Counter(info.node for info in live if info.node)
        return {
            "live_sessions": len(live),
            "sessions_total": self.sessions_total,
            "rejected": dict(self.rejected),
            "bytes_in": self.bytes_in_closed + sum(i.bytes_in for i in live),
            "bytes_out": self.bytes_out_closed + sum(i.bytes_out for i in live),
            "per_node": dict(per_node),
            "started_at": self.started_at,
        }
