"""Service discovery: where an upstream's nodes come from when it names a service.

APISIX's ``discovery_type: dns`` with ``service_name`` (``dns``: resolving in
the background by TTL, ``dnsclient``: the cooperative DNS client).  Hands
the runtime node lists in APISIX's upstream shape; imports no data path,
store, Admin API or config file.
"""
