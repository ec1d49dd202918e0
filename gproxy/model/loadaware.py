"""APISIX's load-aware balancers, ``least_conn`` and ``ewma``, and the state they share.

* ``LeastConn`` - ``apisix/balancer/least_conn.lua``: the node with the lowest
  ``(1 + live sessions) * (1 / weight)``; a session counts from the pick until
  it ends (or until its dial fails and the next node is tried).  The counts
  live in a ``LeastConnState`` keyed by the upstream's resource key and the
  priority level (``/apisix/upstreams/1#0``), held weakly by
  ``Shared.least_conn``, so a route table swap (scaling, health flips, any
  Admin write) keeps the sessions already counted, as APISIX does since
  #12217.  Ties go to the node listed first.  A weight-0 node scores infinity:
  it is picked only when every other node was tried.
* ``Ewma`` - ``apisix/balancer/ewma.lua``: the better of two nodes drawn at
  random, by a connect latency decayed with time (``DECAY_TIME`` 10 s; a node
  untouched for ``SHM_TTL`` 60 s counts as 0 again).  Weights play no part,
  as in APISIX.  The latency table is per node address and shared by every
  upstream of the process (APISIX's ``balancer-ewma`` shared dict).

Both answer ``pick(key, tried)`` like the other pickers.  State is per
process: with ``--workers`` each worker balances its own sessions, as each
nginx worker does.  A session moved to another process (live upgrade,
rebalancing) goes on counting there: what it holds is a ``Counted`` that
names its state's key and node, and ``Shared.count`` takes it again in the
other process; the ewma table is written out and merged the same way
(``export``/``merge``: its clock is CLOCK_MONOTONIC, the same in every
process).  Pure: the clock and the random source are handed in.
"""

import math
import random
import time
import weakref

DECAY_TIME = 10.0  # seconds (ewma.lua)
SHM_TTL = 60.0     # seconds an ewma entry lives without an update (ewma.lua)


class LeastConnState:
    """Live sessions per node address for one upstream and priority level
    (``key``: ``<upstream key>#<priority>``, None for a private one)."""

    __slots__ = ("conns", "key", "__weakref__")

    def __init__(self, key=None):
        self.conns = {}
        self.key = key

    def acquire(self, addr):
        self.conns[addr] = self.conns.get(addr, 0) + 1

    def release(self, addr):
        left = self.conns.get(addr, 0) - 1
        if left > 0:
            self.conns[addr] = left
        else:
            self.conns.pop(addr, None)


class Counted:
    """A session counted on a node, given back once when it ends (``Session.cleanup``
    calls it).  An object rather than a closure so that a session handed to
    another process can name what it holds (``state.key``, ``addr``)."""

    __slots__ = ("state", "addr")

    def __init__(self, state, addr):
        self.state = state  # holds it: the counts outlive every table while counted
        self.addr = addr

    def __call__(self):
        self.state.release(self.addr)


class EwmaTable:
    """Decayed connect latency per node address (``host:port``)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._entries = {}  # addr -> (ewma, last touched)

    def score(self, addr):
        """The estimate decayed to now (``get_or_update_ewma(name, 0, false)``)."""
        entry = self._entries.get(addr)
        if entry is None:
            return 0.0
        ewma, touched = entry
        now = self.clock()
        if now - touched > SHM_TTL:
            return 0.0
        return ewma * math.exp(-max(now - touched, 0.0) / DECAY_TIME)

    def observe(self, addr, rtt):
        """Fold one measured latency (seconds) into ``addr``'s estimate."""
        now = self.clock()
        entry = self._entries.get(addr)
        ewma, touched = entry if entry is not None and now - entry[1] <= SHM_TTL else (0.0, None)
        weight = 0.0 if touched is None else math.exp(-max(now - touched, 0.0) / DECAY_TIME)
        self._entries[addr] = (ewma * weight + rtt * (1.0 - weight), now)
        if len(self._entries) > 4096:  # forget what expired, as the shared dict's TTL does
            self._entries = {a: e for a, e in self._entries.items() if now - e[1] <= SHM_TTL}

    def export(self):
        """``[[addr, ewma, touched]]`` of the entries still alive, JSON-ready."""
        now = self.clock()
        return [[addr, ewma, touched] for addr, (ewma, touched) in self._entries.items()
                if now - touched <= SHM_TTL]

    def merge(self, entries):
        """Another process's entries (``export``), where they are newer than ours."""
        for addr, ewma, touched in entries:
            mine = self._entries.get(addr)
            if mine is None or mine[1] < touched:
                self._entries[addr] = (ewma, touched)


class Shared:
    """What the load-aware pickers of one process share across route tables."""

    def __init__(self, clock=time.monotonic, rng=None):
        self.least_conn = weakref.WeakValueDictionary()
        self.ewma = EwmaTable(clock)
        self.rng = rng or random.Random()

    def least_conn_state(self, name, priority):
        """The counts of upstream ``name`` at ``priority`` (a private one without a name)."""
        if name is None:
            return LeastConnState()
        return self._state("%s#%s" % (name, priority))

    def _state(self, key):
        state = self.least_conn.get(key)
        if state is None:
            state = self.least_conn[key] = LeastConnState(key)
        return state

    def count(self, key, addr):
        """Count a session another process counted on ``addr`` under ``key``
        (``Counted.state.key``); the ``Counted`` that gives it back."""
        state = self._state(key)
        state.acquire(addr)
        return Counted(state, addr)


class LeastConn:
    """Fewest live sessions per weight (least_conn.lua)."""

    counts = True  # dial() acquires the node it dials and releases it at the end

    def __init__(self, nodes, state):
        self.nodes = list(nodes)
        self.state = state
        self._inverse = [1.0 / n.weight if n.weight > 0 else math.inf for n in self.nodes]

    def score(self, index):
        node = self.nodes[index]
        return (1 + self.state.conns.get(node.addr, 0)) * self._inverse[index]

    def pick(self, key=None, tried=()):
        best, best_score = None, None
        for index, node in enumerate(self.nodes):
            if node in tried:
                continue
            score = self.score(index)
            if best is None or score < best_score:
                best, best_score = node, score
        return best

    def acquire(self, node):
        """Count a session on ``node``; the ``Counted`` that gives it back."""
        self.state.acquire(node.addr)
        return Counted(self.state, node.addr)


class Ewma:
    """The lower decayed latency of two random untried nodes (ewma.lua)."""

    counts = False

    def __init__(self, nodes, table, rng):
        self.nodes = list(nodes)
        self.table = table
        self.rng = rng

    def pick(self, key=None, tried=()):
        peers = [node for node in self.nodes if node not in tried]
        if len(peers) < 2:
            return peers[0] if peers else None
        a = self.rng.randrange(len(peers))
        b = self.rng.randrange(len(peers) - 1)
        if b >= a:
            b += 1
        first, second = peers[a], peers[b]
        if self.table.score(first.addr) > self.table.score(second.addr):
            return second
        return first
