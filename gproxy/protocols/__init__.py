"""Sans-IO parsers of what clients send: bytes in, parsed values or errors out.

Owns: the MQTT CONNECT (``mqtt``), packet boundaries (``mqttstream``), the
WebSocket upgrade (``wshandshake``) and frames (``wsframe``), the PROXY
protocol header (``proxyproto``), the TLS ClientHello's server name
(``tlshello``), the CONNECT rewrite (``mqttconnect``), and log-safe text from
the wire (``text``).  Every function here is pure: no sockets, no clocks, no
logging.  Must import nothing of gproxy but ``gproxy.errors``.
"""
