"""Service discovery over DNS as APISIX does it: records -> upstream nodes (pure).

``apisix/discovery/dns/init.lua`` and ``apisix/core/dns/client.lua``:

* ``service_name`` is ``host`` or ``host:port``; a port there wins over any
  record's.
* The first record type of ``order`` (APISIX's default ``last, SRV, A,
  AAAA, CNAME``; ``last`` is the type that answered last time) that has
  records is the answer: A and AAAA are not merged.
* SRV (``srv_records``): each target resolves to its addresses; weight 0
  counts as 1 (RFC 2782's "very small chance"), a target's weight is split
  evenly over its addresses and all are scaled by the least common multiple
  of the address counts, so they stay integers; the port is the record's;
  the priority is the record's, negated (lower SRV priority is tried first,
  higher APISIX priority is), so priority groups and retries follow it.
* A stream upstream needs a port: a node with neither a ``service_name``
  port nor a non-zero SRV port is dropped (APISIX: "ignore zero port when
  subsystem is stream").

Nodes come out as APISIX's array form (``{host, port, weight, priority}``),
the shape an Admin write gives an upstream.  Pure: lookups are the caller's.
"""

import math
from dataclasses import dataclass

DEFAULT_ORDER = ("last", "SRV", "A", "AAAA", "CNAME")
TYPES = ("SRV", "A", "AAAA", "CNAME")


@dataclass(frozen=True)
class Record:
    """One resolved address: ``port``, ``weight``, ``priority`` from an SRV record."""

    address: str
    port: int = None
    weight: int = None
    priority: int = None


def split_service(name):
    """``(host, port or None)`` from ``host``, ``host:port`` or ``[v6]:port``."""
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = name.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return name, None


def srv_records(answers):
    """Records for SRV ``answers`` ``[(priority, weight, port, [addresses])]``.

    APISIX's resolve_srv: weight 0 is 1, split over the target's addresses,
    then multiplied by the lcm of the address counts.
    """
    lcm = 1
    for *_, addresses in answers:
        lcm = lcm * len(addresses) // math.gcd(lcm, len(addresses)) if addresses else lcm
    out = []
    for priority, weight, port, addresses in answers:
        for address in addresses:
            share = (weight or 1) * lcm // len(addresses)
            out.append(Record(address, port, share, priority))
    return out


def nodes(service_name, records):
    """APISIX's nodes for ``records`` (a list of ``Record``), in record order."""
    _, port = split_service(service_name)
    out = []
    for record in records:
        node_port = port
        if node_port is None and record.port:  # a zero port falls back: none, in stream
            node_port = record.port
        if node_port is None:
            continue  # ignored in stream
        node = {"host": record.address, "port": node_port,
                "weight": record.weight if record.weight is not None else 1}
        if record.priority is not None:
            node["priority"] = -record.priority
        out.append(node)
    return out


def service_names(data):
    """Every ``service_name`` a ``discovery_type: dns`` upstream in ``data`` names."""
    return {up["service_name"] for up in _upstreams(data)
            if up.get("discovery_type") == "dns" and up.get("service_name")}


def with_nodes(data, found):
    """``data`` with each dns upstream given ``found[service_name]`` as its ``nodes``.

    ``data`` is the store's ``{stream_routes, upstreams, ...}``; what comes back
    shares everything but the upstreams it fills in (copies), so the store's
    objects are never changed.  A name with no answer yet gets no nodes.
    """
    return dict(data, stream_routes=[fill_item("stream_routes", r, found)
                                     for r in data.get("stream_routes") or ()],
                upstreams=[fill_item("upstreams", up, found) for up in data.get("upstreams") or ()])


def item_service(kind, value):
    """The ``service_name`` a stored upstream or route (its inline upstream) looks
    up over DNS, or None."""
    up = value if kind == "upstreams" else value.get("upstream")
    if isinstance(up, dict) and up.get("discovery_type") == "dns":
        return up.get("service_name") or None
    return None


def fill_item(kind, value, found):
    """A stored upstream or route with its dns upstream given ``found[service_name]``
    as its ``nodes`` (a copy; anything else comes back as it is)."""
    name = item_service(kind, value)
    if name is None:
        return value
    if kind == "upstreams":
        return dict(value, nodes=found.get(name) or [])
    return dict(value, upstream=dict(value["upstream"], nodes=found.get(name) or []))


def _upstreams(data):
    for up in data.get("upstreams") or ():
        yield up
    for route in data.get("stream_routes") or ():
        if isinstance(route.get("upstream"), dict):
            yield route["upstream"]
