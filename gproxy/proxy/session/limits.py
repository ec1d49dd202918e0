"""The ``limits`` phase: a route's ``gproxy-limit-rate`` and ``limit-conn`` plugins.

Runs after the route and its upstream are known and before the MQTT preread,
in APISIX's plugin order (limit-conn, priority 1003, before mqtt-proxy,
1000), or right after the refine when the CONNECT chooses the route; the rate limit goes first, so a reconnect storm is turned away before
it takes a connection slot.  A refused client is closed with the plugin's
exit line (APISIX: ``limit-conn exits with status code 503``) and counted as
``limit_conn`` or ``limit_rate``.  Counts live in ``Limits``, one per
process, keyed by route id (and the plugin's key), so a route table swap
neither resets them nor loses the sessions it counted; a session gives its
slot back when it ends (``Session.cleanup``).  A route's rate buckets are
replaced when its ``rate`` or ``burst`` changes, and forgotten once they
have all drained (a deleted or quiet route), a few checks a call, so
neither table only grows.
"""

import logging
import time
from collections import OrderedDict

import gevent

from gproxy.errors import Reject
from gproxy.model.limits import RateLimit, conn_delay


class Limits:
    """Live counts for ``limit-conn`` and buckets for ``gproxy-limit-rate``."""

    def __init__(self):
        self.conns = {}  # (route id, key) -> sessions counted
        self.rates = OrderedDict()  # route id -> RateLimit, least recently used first

    def acquire(self, key):
        count = self.conns.get(key, 0) + 1
        self.conns[key] = count
        return count

    def release(self, key):
        count = self.conns.get(key, 0) - 1
        if count > 0:
            self.conns[key] = count
        else:
            self.conns.pop(key, None)

    def bucket(self, route_id, conf, now):
        """The route's ``RateLimit`` for ``conf`` (its ``allow`` is the caller's)."""
        rate, burst = float(conf["rate"]), conf.get("burst", 0)
        found = self.rates.get(route_id)
        if found is None or (found.rate, found.burst) != (rate, burst):
            found = self.rates[route_id] = RateLimit(rate, burst)
        found.last = now
        self.rates.move_to_end(route_id)
        for _ in range(2):  # the least recently used route, if all its buckets drained
            oldest = next(iter(self.rates.values()))
            if oldest is found or not oldest.drained(now):
                break
            self.rates.popitem(last=False)
        return found


class Slot:
    """A session's ``limit-conn`` slot, given back when it ends (``Session.cleanup``).

    An object rather than a closure so a session handed to another process
    (``session.moved``) can name the slots it holds there."""

    __slots__ = ("table", "key")

    def __init__(self, table, key):
        self.table = table
        self.key = key

    def __call__(self):
        self.table.release(self.key)


def _var(s, name):
    info = s.info
    return info.server_addr if name == "server_addr" else info.client_addr


def limits(s):
    route = s.route
    if route is None:
        return  # the CONNECT chooses the route: the refine phase runs this
    if route.limit_rate is not None:
        _rate(s, route.limit_rate)
    if route.limit_conn is not None:
        _conn(s, route.limit_conn)


def _rate(s, conf):
    kind = conf.get("key", "route")
    key = "" if kind == "route" else _var(s, kind)
    now = time.monotonic()
    if not s.proxy.limits.bucket(s.route.id, conf, now).allow(key, now):
        raise Reject("limit_rate", logging.WARNING,
                     "gproxy-limit-rate exits with status code 503")


def _conn(s, conf):
    table = s.proxy.limits
    key = (s.route.id, _var(s, conf["key"]))
    count = table.acquire(key)
    delay = conn_delay(count, conf)
    if delay is None:
        table.release(key)
        raise Reject("limit_conn", logging.WARNING, "limit-conn exits with status code 503")
    s.cleanup.append(Slot(table, key))
    if delay >= 0.001:
        gevent.sleep(delay)  # resty.limit.conn: the excess waits, then goes on
