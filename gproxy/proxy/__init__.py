"""The data path: listeners, session phases, dialling, the relay, the registry.

Owns: bound listeners and accept (``listener``), one session's phases up to
the hand-off (``session``, ``phases``, ``preread``, ``dial``; MQTT over
WebSocket in ``wspreread``; a listener's PROXY protocol and TLS phases in
``proxyproto`` and ``tls``, its certificates in ``tlsctx``), cooperative I/O
on C-level sockets (``netio``),
the two-way byte pump on hub watchers (``relay``, with ``wsendpoint`` for
WebSocket clients; what all relays share, the event queue and the idle
sweeper, in ``relayhub`` and ``events``), and live sessions as metadata
(``registry``).  Works from an
immutable ``RouteTable`` it is handed.  Must not import HTTP, Flask, the
Admin API, the store or the runtime.
"""
