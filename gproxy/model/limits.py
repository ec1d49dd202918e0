"""Connection limits per route: APISIX's ``limit-conn`` and gproxy's ``gproxy-limit-rate``.

* ``conn_delay`` is resty.limit.conn's ``incoming`` for APISIX's stream
  ``limit-conn`` plugin: with ``conn`` sessions already counted for a key, a
  new one is rejected beyond ``conn + burst``, and one beyond ``conn`` waits
  ``default_conn_delay * floor((n - 1) / conn)`` seconds before going on.
* ``RateLimit`` is nginx's ``limit_req`` leaky bucket (with ``nodelay``): at
  most ``rate`` new sessions a second on average, ``burst`` more at once;
  the excess is refused at once rather than queued, which is what a
  reconnect storm needs (clients back off and retry).  Its table of keys
  shrinks as they drain: a bucket untouched for ``(burst + 1) / rate``
  seconds is empty, so keys are kept least recently used first and each
  call drops a few drained ones from the front (constant work a call, no
  sweep of the table), and beyond ``MAX_KEYS`` the least recently used one
  goes, as in nginx's zone.

Pure: callers pass the clock.
"""

import math
from collections import OrderedDict

#: APISIX's schema for the stream limit-conn plugin (apisix/stream/plugins/limit-conn.lua).
LIMIT_CONN_SCHEMA = {
    "type": "object",
    "properties": {
        "conn": {"type": "integer", "exclusiveMinimum": 0},
        "burst": {"type": "integer", "minimum": 0},
        "default_conn_delay": {"type": "number", "exclusiveMinimum": 0},
        "only_use_default_delay": {"type": "boolean"},
        "key": {"type": "string", "enum": ["remote_addr", "server_addr"]},
    },
    "required": ["conn", "burst", "default_conn_delay", "key"],
}
#: gproxy's extension: new sessions per second, per route or per client/listener address.
LIMIT_RATE_SCHEMA = {
    "type": "object",
    "properties": {
        "rate": {"type": "number", "exclusiveMinimum": 0},
        "burst": {"type": "integer", "minimum": 0},
        "key": {"type": "string", "enum": ["route", "remote_addr", "server_addr"]},
    },
    "required": ["rate"],
    "additionalProperties": False,
}


def conn_delay(count, conf):
    """Seconds the ``count``-th concurrent session must wait, or None to reject it."""
    limit = conf["conn"]
    if count > limit + conf["burst"]:
        return None
    if count > limit:
        return conf["default_conn_delay"] * math.floor((count - 1) / limit)
    return 0.0


class RateLimit:
    """One leaky bucket per key (nginx ``limit_req``, excess refused at once)."""

    MAX_KEYS = 100000  # nginx: a full zone drops its least recently used state
    EXPIRE_EACH = 8    # drained keys dropped per call at most (more than one call adds)

    def __init__(self, rate, burst=0):
        self.rate = float(rate)
        self.burst = burst
        self.horizon = (burst + 1) / self.rate  # a bucket this long untouched is empty
        self.buckets = OrderedDict()  # key -> (excess, last time), least recently set first
        self.last = -math.inf  # the latest call (see Limits)

    def allow(self, key, now):
        self.last = now
        self._expire(now)
        excess, last = self.buckets.get(key, (0.0, now))
        excess = max(excess - self.rate * (now - last), 0.0) + 1.0
        if excess > self.burst + 1:
            return False
        self.buckets[key] = (excess, now)
        self.buckets.move_to_end(key)
        if len(self.buckets) > self.MAX_KEYS:
            self.buckets.popitem(last=False)
        return True

    def drained(self, now):
        """True when every bucket is empty by ``now`` (forgetting them loses nothing)."""
        return now - self.last >= self.horizon

    def _expire(self, now):
        buckets = self.buckets
        for _ in range(self.EXPIRE_EACH):
            if not buckets:
                return
            key = next(iter(buckets))
            if now - buckets[key][1] < self.horizon:
                return
            del buckets[key]
