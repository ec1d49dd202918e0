"""The fleet: many gproxy instances on one etcd, seen and driven as one.

Owns the instance registry (``instances``: each instance's record under
APISIX's ``<prefix>/data_plane/server_info/<id>``, on a lease it renews),
fleet-wide session queries (``peers``: the other instances' Admin APIs,
asked in parallel and within a deadline, pages merged as one), and
fleet-wide evictions (``jobs`` and ``shares``: a job kept in etcd, each
instance ending its own share at its part of the rate).  ``Fleet`` and, on
the file store, ``SoloFleet`` are what the Admin API is handed.

Sits between the runtime, which builds it, and the data path and the store,
which it uses (the sessions view it is handed, the etcd store's cluster).
Every etcd and HTTP call runs off the hub (``blocking``).
"""

from gproxy.fleet.fleet import Fleet, SoloFleet  # noqa: F401
