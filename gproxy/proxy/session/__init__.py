"""Session: one client from its first phase to the hand-off to the relay.

``Proxy``/``Session`` run a listener's pipeline (``session``); the common
phases (``phases``): match a route, find its upstream, limits (``limits``),
preread the CONNECT (``preread``; over WebSocket in ``wspreread``), refine
the route by the CONNECT and split its clients between upstreams
(``refine``), choose and dial a node (``dial``), replay.
"""
