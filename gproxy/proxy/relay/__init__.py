"""Relay: the two-way byte pump a session becomes once both ends are connected.

``Relay`` (``relay``) moves bytes on hub watchers, one ``Direction`` per way
(``direction``: backlog, pipe, packet boundaries); what every relay of a
process shares, the event queue and the idle sweeper, is ``RelayHub``
(``hub``, ``events``); ``wsendpoint`` is the client endpoint for MQTT over
WebSocket.  Nothing here knows routes or the registry's tables.
"""
