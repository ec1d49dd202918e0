"""Preread: buffer the client's first packet without consuming it, and check it.

The mqtt-proxy plugin's preread (docs/apisix-behaviour.md §1-2): read until
the whole CONNECT is there (bounded by ``gproxy.preread.timeout`` and
``gproxy.preread.buffer_size``), check protocol name and level, and set the
``mqtt_client_id`` variable (left unset for an empty id, so chash falls back
to the client address).  Every byte read is kept for the replay.
"""

import logging
import socket
import time

from gproxy.errors import MalformedPacket, Reject
from gproxy.protocols import mqtt
from gproxy.protocols.text import printable
from gproxy.proxy import netio

RECV_SIZE = 4096
#: APISIX's run_plugin logs this after any mqtt-proxy rejection (§2).
PLUGIN_EXIT = "mqtt-proxy exits with status code 503"


def preread_mqtt(s, conf):
    settings = s.settings
    deadline = time.monotonic() + settings.preread_timeout
    buf = b""
    packet = None
    try:
        while packet is None:
            chunk = netio.recv(s.sock, RECV_SIZE, deadline)
            if not chunk:
                _short_read(s, buf, "closed")
            buf += chunk
            packet = mqtt.parse_connect(buf, settings.max_packet)
        mqtt.check_protocol(packet, conf.protocol_name, conf.protocol_level)
    except socket.timeout:
        _short_read(s, buf, "timeout")
    except OSError as exc:
        _short_read(s, buf, exc.strerror or str(exc))
    except MalformedPacket as exc:
        _plugin_exit(s, exc.reason, "%s" % exc)
    if packet.client_id:  # an empty id leaves the var unset, as in APISIX
        s.vars["mqtt_client_id"] = packet.client_id
    info = s.info
    info.client_id = packet.client_id_text
    info.protocol_level = packet.protocol_level
    s.keep_alive = packet.keep_alive
    s.log(logging.INFO, "mqtt client id: %s", printable(packet.client_id))
    s.replay = buf


def _plugin_exit(s, reason, line):
    """The plugin's error line, then APISIX's exit line; the session ends."""
    s.log(logging.ERROR, "%s", line)
    raise Reject(reason, logging.WARNING, PLUGIN_EXIT)


def _short_read(s, buf, why):
    try:
        header_done = mqtt.packet_length(buf) is not None
    except MalformedPacket:
        header_done = False
    what = "the Connect Command" if header_done else "the msg header"
    _plugin_exit(s, "timeout" if why == "timeout" else "closed",
                 "failed to read %s: %s" % (what, why))
