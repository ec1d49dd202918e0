"""The registry: live sessions as metadata records, plus counters kept as they change.

A session is a ``SessionInfo`` (ids, addresses, route, node, byte counts,
timestamps); the table never holds a socket.  Its owner registers a *handle*
next to the record (an object with ``close()`` and ``end(code, grace,
server_reference)``), which is how an operator disconnects or evicts it.

Every count a reader needs (live sessions per route, node and state;
sessions and rejections since start) is kept up to date as sessions start,
change state and end, so the Admin API, the dashboard and the metrics read
counters instead of walking every session.  That is why the state and node
of a tracked session change only through ``set_state``/``set_node``
(and its transport through ``set_transport``).
``snapshot()`` and ``stats()`` return plain JSON-ready dicts so worker
processes can each report theirs and a parent can merge them.  No I/O.
"""

import bisect
import heapq
import itertools
import operator
import os
import time
from collections import Counter
from dataclasses import dataclass, field, fields

STATES = ("preread", "connecting", "relaying", "closing")
#: Upper bounds (seconds) of the dial latency histogram's buckets.
DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0, 60.0)
QUERY_CHUNK = 256
SORT_RUN = 1024  # records sorted in one step (about 0.3 ms)
_BYTES_IN = operator.attrgetter("bytes_in")
_BYTES_OUT = operator.attrgetter("bytes_out")  # records filtered between two pauses (well under a millisecond)


@dataclass(slots=True)
class SessionInfo:
    """One client connection, from accept to close. Never holds credentials.

    Slotted: thousands live at once (less memory per idle session, faster
    attribute access on the relay's hot path).
    """

    id: str
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int
    route_id: str = None
    client_id: str = None
    protocol_level: int = None
    node: str = None
    username: str = None  # MQTT CONNECT username (never the password)
    sni: str = None  # TLS server name, on TLS listeners
    tls_client_cn: str = None  # subject CN of a verified client certificate
    bytes_in: int = 0   # client -> broker
    bytes_out: int = 0  # broker -> client
    connected_at: float = field(default_factory=time.time)
    state: str = "preread"
    transport: str = "tcp"  # "ws": MQTT over WebSocket, "wss": over TLS
    upstream_id: str = None  # the route's upstream_id (None: its inline upstream)
    # The chash key the balancer was given (bytes; a client id or IP, never a
    # credential): what rebalancing needs to ask the ring where it belongs now.
    hash_key: bytes = field(default=None, repr=False)

    @property
    def seq(self):
        """The per-process connection number, nginx's ``*<n>`` in log lines."""
        return self.id.rpartition("-")[2]

    def as_dict(self):
        """The record as JSON-ready values (the raw hash key stays out).

        Plain attribute reads rather than ``dataclasses.asdict``: a page of 500
        records is copied in well under a millisecond instead of several."""
        return {name: getattr(self, name) for name in _PUBLIC}


_PUBLIC = tuple(f.name for f in fields(SessionInfo) if f.name != "hash_key")


class Registry:
    """Live sessions and counters of one process."""

    def __init__(self, worker=None):
        self._prefix = "%s-" % (worker if worker is not None else os.getpid())
        self._count = itertools.count(1)
        self._live = {}
        self._handles = {}
        self.started_at = time.time()
        self.sessions_total = 0
        self.route_total = {}   # sessions ever matched, per route
        self.rejected = Counter()      # refused before proxying, per reason
        self.per_route = {}     # live, per route
        self.per_node = {}      # live, per node
        self.per_state = {}     # live, per state
        self.per_transport = {}  # live, per transport (tcp, ws, wss)
        self.bytes_in_closed = 0
        self.bytes_out_closed = 0
        self.connect_failures = Counter()  # failed dials, per "node reason" (error|timeout)
        self.dial_buckets = [0] * (len(DIAL_BUCKETS) + 1)  # last: slower than every bound
        self.dial_sum = 0.0
        self.sessions_moved = 0  # handed to another process (live upgrade, rebalancing)

    # -- handover (live upgrade) -------------------------------------------
    #: The totals a process hands its successor, which adds them to its own.
    TOTALS = ("sessions_total", "route_total", "rejected", "bytes_in_closed",
              "bytes_out_closed", "connect_failures", "dial_buckets", "dial_sum")

    def totals(self):
        """What ``carry`` in another process needs, JSON-ready (plus the start time)."""
        out = {name: getattr(self, name) for name in self.TOTALS}
        out["route_total"] = [[k, v] for k, v in self.route_total.items()]
        out["started_at"] = self.started_at
        return out

    def carry(self, totals):
        """Add a predecessor's totals to ours: counters never go back at an upgrade."""
        self.started_at = min(self.started_at, totals["started_at"])
        self.sessions_total += totals["sessions_total"]
        for route, n in totals["route_total"]:
            self.route_total[route] = self.route_total.get(route, 0) + n
        self.rejected.update(totals["rejected"])
        self.connect_failures.update(totals["connect_failures"])
        self.bytes_in_closed += totals["bytes_in_closed"]
        self.bytes_out_closed += totals["bytes_out_closed"]
        for i, n in enumerate(totals["dial_buckets"][:len(self.dial_buckets)]):
            self.dial_buckets[i] += n
        self.dial_sum += totals["dial_sum"]

    def new_session(self, client, server):
        """A fresh SessionInfo for a client ``(ip, port)`` on a listener ``(ip, port)``."""
        return SessionInfo(self._prefix + str(next(self._count)), client[0], client[1],
                           server[0], server[1])

    # -- life cycle --------------------------------------------------------
    def add(self, info, handle=None):
        """Show ``info`` as live; ``handle`` is how an operator may end it."""
        self._live[info.id] = info
        if handle is not None:
            self._handles[info.id] = handle
        self.sessions_total += 1
        route = info.route_id
        if route is not None:  # else counted when the CONNECT chooses it (set_route)
            totals = self.route_total
            totals[route] = totals.get(route, 0) + 1
            _up(self.per_route, route)
        _up(self.per_state, info.state)
        _up(self.per_transport, info.transport)
        if info.node is not None:
            _up(self.per_node, info.node)

    def set_handle(self, info, handle):
        """From now on ``handle`` is how an operator ends this live session (a
        session that starts relaying hands over to its relay)."""
        if info.id in self._live:
            self._handles[info.id] = handle

    def adopt(self, info, handle):
        """Show a session handed over from another process as live: counted in
        the live tables, not as a new session (its totals came with it)."""
        self._live[info.id] = info
        self._handles[info.id] = handle
        if info.route_id is not None:
            _up(self.per_route, info.route_id)
        _up(self.per_state, info.state)
        _up(self.per_transport, info.transport)
        if info.node is not None:
            _up(self.per_node, info.node)

    def set_state(self, info, state):
        if info.id in self._live and info.state != state:
            counts = self.per_state
            _down(counts, info.state)
            counts[state] = counts.get(state, 0) + 1
        info.state = state

    def set_route(self, info, route_id):
        """The route a tracked session's CONNECT chose (it had none before)."""
        if info.id in self._live:
            _move(self.per_route, info.route_id, route_id)
            self.route_total[route_id] = self.route_total.get(route_id, 0) + 1
        info.route_id = route_id

    def set_transport(self, info, transport):
        if info.id in self._live:
            _move(self.per_transport, info.transport, transport)
        info.transport = transport

    def set_node(self, info, node):
        if info.id in self._live:
            _move(self.per_node, info.node, node)
        info.node = node

    def remove(self, info, moved=False):
        """The session has ended: fold its bytes into the totals (``moved``: it
        lives on in another process, which counts them from now on)."""
        if self._live.pop(info.id, None) is None:
            return
        self._handles.pop(info.id, None)
        _down(self.per_route, info.route_id)
        _down(self.per_state, info.state)
        if info.node is not None:
            _down(self.per_node, info.node)
        _down(self.per_transport, info.transport)
        if moved:
            self.sessions_moved += 1
            return
        self.bytes_in_closed += info.bytes_in
        self.bytes_out_closed += info.bytes_out
        info.state = "closed"

    def reject(self, reason):
        """Count a connection refused before proxying (``reason`` is a short token)."""
        self.rejected[reason] += 1

    def dialled(self, node, seconds):
        """A dial to ``node`` connected after ``seconds`` (the latency histogram)."""
        self.dial_buckets[bisect.bisect_left(DIAL_BUCKETS, seconds)] += 1
        self.dial_sum += seconds

    def connect_failed(self, node, reason):
        """A dial to ``node`` failed (``reason``: ``error`` or ``timeout``)."""
        self.connect_failures["%s %s" % (node, reason)] += 1

    # -- reading -----------------------------------------------------------
    def get(self, session_id):
        return self._live.get(session_id)

    def handle(self, session_id):
        return self._handles.get(session_id)

    def ids(self, route_id=None):
        """Ids of live sessions (of one route, if given), oldest first."""
        if route_id is None:
            return list(self._live)
        route_id = str(route_id)
        return [sid for sid, info in self._live.items() if info.route_id == route_id]

    def __len__(self):
        return len(self._live)

    def query(self, where=None, key=None, reverse=False, limit=None, tally=None,
              pause=None, every=QUERY_CHUNK):
        """``(total, first, counts)`` over the live sessions ``where(info)`` accepts.

        ``first``: the first ``limit`` of them ordered by ``key(info)``
        (``reverse`` for descending; equal keys stay oldest first either way),
        ``counts``: how many per value of ``tally(info)`` (None without it).
        The records are walked in chunks of ``every`` with ``pause()`` called
        between chunks, so a caller on a gevent hub passes a yield and the data
        path keeps running while 10,000 sessions are filtered; sessions that end
        meanwhile are left out of ``first``.  Sorting too: runs of ``SORT_RUN``
        are sorted on their own, a pause between runs, and merged lazily
        (stable: ties keep start order) only as far as ``first`` needs, so no
        step sorts every matched session at once.  Pure: ``pause`` is the caller's.
        """
        infos = list(self._live.values())
        matched = []
        counts = Counter() if tally is not None else None
        for start in range(0, len(infos), every):
            chunk = infos[start:start + every]
            if where is not None:
                chunk = [info for info in chunk if where(info)]
            matched.extend(chunk)
            if counts is not None:
                counts.update(map(tally, chunk))
            if pause is not None and start + every < len(infos):
                pause()
        ordered = iter(matched)
        if key is not None:
            ordered = _sorted_lazily(matched, key, reverse, pause)
        first = []
        for info in ordered:
            if limit is not None and len(first) >= limit:
                break
            if info.state != "closed":
                first.append(info)
                if pause is not None and len(first) % (4 * SORT_RUN) == 0:
                    pause()  # a cheap step per record: a pause now and then
        return len(matched), first, counts

    def snapshot(self):
        """Live sessions as plain dicts, oldest first."""
        return [info.as_dict() for info in list(self._live.values())]

    def stats(self):
        live = self._live.values()  # byte counts move with every packet: summed in C
        return {
            "live_sessions": len(self._live),
            "sessions_total": self.sessions_total,
            "rejected": dict(self.rejected),
            "bytes_in": self.bytes_in_closed + sum(map(_BYTES_IN, live)),
            "bytes_out": self.bytes_out_closed + sum(map(_BYTES_OUT, live)),
            "per_node": dict(self.per_node),
            "per_route": {str(k): v for k, v in self.per_route.items()},
            "per_state": dict(self.per_state),
            "per_transport": dict(self.per_transport),
            "route_total": {str(k): v for k, v in self.route_total.items()},
            "connect_failures": dict(self.connect_failures),
            "dial_buckets": {str(i): n for i, n in enumerate(self.dial_buckets) if n},
            "dial_sum": self.dial_sum,
            "started_at": self.started_at,
        }

    # -- acting on sessions ------------------------------------------------
    def close(self, session_id):
        """Close a live session at once; True if it was known and closable."""
        handle = self._handles.get(session_id)
        if handle is None:
            return False
        handle.close()
        return True

    def close_where(self, route_id=None):
        """Close every live session (of one route, if given); returns the ids closed."""
        return [sid for sid in self.ids(route_id) if self.close(sid)]

    def end(self, session_id, code, grace, server_reference=None):
        """End a live session cleanly (DISCONNECT at a packet boundary); True if known."""
        handle = self._handles.get(session_id)
        if handle is None:
            return False
        handle.end(code, grace, server_reference)
        return True


def _up(counter, key):
    """One more ``key`` in ``counter`` (the hot path's half of ``_move``)."""
    counter[key] = counter.get(key, 0) + 1


def _down(counter, key):
    """One ``key`` fewer in ``counter``; the key goes at zero."""
    left = counter.get(key, 0) - 1
    if left > 0:
        counter[key] = left
    else:
        counter.pop(key, None)


def _move(counter, old, new):
    """One item moves from ``old`` to ``new`` (None: nowhere) in ``counter``.

    Plain dict operations: a missing key in a Counter costs a Python-level
    ``__missing__`` call, and this runs several times per session.
    """
    if old == new:
        return
    if old is not None:
        left = counter.get(old, 0) - 1
        if left > 0:
            counter[old] = left
        else:
            counter.pop(old, None)
    if new is not None:
        counter[new] = counter.get(new, 0) + 1


def _sorted_lazily(items, key, reverse, pause):
    """``items`` in ``key`` order, as a stable lazy merge of runs sorted one by one."""
    runs = []
    for start in range(0, len(items), SORT_RUN):
        run = items[start:start + SORT_RUN]
        run.sort(key=key, reverse=reverse)  # stable, as is the merge: ties keep start order
        runs.append(run)
        if pause is not None and start + SORT_RUN < len(items):
            pause()
    return heapq.merge(*runs, key=key, reverse=reverse) if len(runs) > 1 else iter(
        runs[0] if runs else ())
