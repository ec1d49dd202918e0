"""The routes with ``vars`` of one route table, in the order a CONNECT tries them.

Order (docs/routing.md): highest ``priority`` first, ties by route id
(numeric ids in numeric order, before the others in string order).
``candidates(values)`` gives, in that order, only the routes a CONNECT with
these variable values could pass: a route whose rule needs a variable to be
one of some strings (``Expr.need``: an ``==`` or ``in`` on every way through
the rule) is indexed under those strings, so a thousand tenants keyed by
username cost one dictionary lookup, not a thousand rule evaluations.  Routes
without such a need are always candidates.  Pure and immutable, like the
route table that owns it.
"""

import heapq


def rank(route):
    """The sort key: highest ``priority`` first, then by id."""
    rid = route.id
    digits = rid.isdigit()
    return (-route.priority, 0 if digits else 1, int(rid) if digits else 0, rid)


class VarsRoutes:
    """``ordered`` (every route with vars) and ``candidates(values)``."""

    def __init__(self, routes):
        self.ordered = sorted((r for r in routes if r.vars is not None), key=rank)
        self._index = {}  # variable -> value (bytes) -> [(position, route)]
        self._always = []  # [(position, route)] with no need: checked for every CONNECT
        for position, route in enumerate(self.ordered):
            need = route.vars.need
            if need is None:
                self._always.append((position, route))
                continue
            name, wanted = need
            by_value = self._index.setdefault(name, {})
            for value in wanted:
                by_value.setdefault(value, []).append((position, route))
        self._always_routes = [route for _, route in self._always]

    def __bool__(self):
        return bool(self.ordered)

    def candidates(self, values):
        """The routes a CONNECT with ``values`` (name -> bytes or None) may pass, in order."""
        if not self._index:
            return self.ordered
        hits = []
        for name, by_value in self._index.items():
            found = by_value.get(values.get(name))
            if found:
                hits.extend(found)
        if not hits:
            return self._always_routes
        hits.sort(key=_position)  # a route has one need, a variable one value: no repeats
        return (route for _, route in heapq.merge(hits, self._always, key=_position))


def _position(item):
    return item[0]
