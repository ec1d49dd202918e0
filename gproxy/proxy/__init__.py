"""The data path, in rooms by lifetime.

``accept`` (listeners, overload, PROXY protocol, TLS handshake), ``session``
(one client's phases up to the hand-off: route, preread, dial, replay),
``relay`` (the byte pump and what all relays share) and ``sessions`` (the
registry of live sessions, the live view the Admin API queries, evictions).
Shared by several rooms: ``netio`` (cooperative I/O on C-level sockets),
``settings`` (the data path's knobs) and ``health`` (the active checkers and
passive reports).  Works from an immutable ``RouteTable`` it is handed.  Must
not import HTTP, Flask, the Admin API, the store or the runtime.
"""
