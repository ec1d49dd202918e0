"""Sans-IO parsers of what clients send: bytes in, parsed values or errors out.

Owns: the MQTT CONNECT (``mqtt``), packet boundaries (``mqttstream``), the
WebSocket upgrade (``wshandshake``) and frames (``wsframe``), and log-safe
text from the wire (``text``); room for the PROXY protocol header and the TLS
ClientHello.  Every function here is pure: no sockets, no clocks, no
logging.  Must import nothing of gproxy but ``gproxy.errors``.
"""
