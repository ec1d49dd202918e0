"""Preread: buffer the client's first packet without consuming it, and check it.

The mqtt-proxy plugin's preread (docs/apisix-behaviour.md §1-2): read until
the whole CONNECT is there (bounded by ``gproxy.preread.timeout`` and
``gproxy.preread.buffer_size``), check protocol name and level, and set the
``mqtt_client_id`` variable (left unset for an empty id, so chash falls back
to the client address) and gproxy's ``mqtt_username``.  Every byte read is
kept for the replay, unchanged, unless the route asks for a CONNECT rewrite
(``set_connect``, NGINX Plus's ``mqtt_set_connect``): then the CONNECT is
re-encoded with the new fields and the bytes after it follow unchanged.  The
reading and checking (``read_connect``) is shared with MQTT over WebSocket,
whose CONNECT arrives in frames (``wspreread``), so both log the same lines.
"""

import logging
import re
import socket
import time

from gproxy.errors import MalformedPacket, Reject
from gproxy.protocols import mqtt, mqttconnect
from gproxy.protocols.text import printable
from gproxy.proxy import netio
from gproxy.proxy.session.dial import session_vars

RECV_SIZE = 4096
#: A WebSocket client's upgrade request starts with "GET"; a CONNECT with 0x10.
HTTP_GET = ord("G")
#: APISIX's run_plugin logs this after any mqtt-proxy rejection (§2).
PLUGIN_EXIT = "mqtt-proxy exits with status code 503"
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
log = logging.getLogger("gproxy.session")  # Session.log's logger


def preread_mqtt(s, conf, on_http=None):
    """Read and check the CONNECT from the client socket; keep every byte for the replay.

    ``on_http(s, conf, first_chunk, deadline)``, if given, takes over when the
    first byte is an HTTP ``G``(ET) instead of a CONNECT (0x10): MQTT over
    WebSocket on the same port (``wspreread``).  It returns the replay bytes.
    """
    deadline = time.monotonic() + s.settings.preread_timeout
    sock = s.sock
    http = None if on_http is None else (lambda chunk: on_http(s, conf, chunk, deadline))
    s.replay = read_connect(s, conf, lambda: netio.recv(sock, RECV_SIZE, deadline), http)


def read_connect(s, conf, recv, on_http=None):
    """MQTT bytes from ``recv()`` (b"" at EOF) until the whole CONNECT is there.

    Checks it against the route's ``conf``, sets what chash and the registry
    need, and returns the bytes to replay.  A failure logs APISIX's lines and
    raises Reject.  Raw MQTT and MQTT unwrapped from WebSocket frames share it.
    With ``conf.protocol_level`` None (the candidates' preread: the CONNECT
    chooses the route) nothing is checked yet: ``accept_connect`` applies the
    chosen route's conf after the refine.
    """
    max_packet = s.settings.max_packet
    buf = b""
    packet = None
    try:
        while packet is None:
            chunk = recv()
            if not chunk:
                _short_read(s, buf, "closed")
            if on_http is not None and not buf and chunk[0] == HTTP_GET:
                return on_http(chunk)
            buf += chunk
            s.replay = buf  # so far: a refusal's access log line counts what was read
            packet = mqtt.parse_connect(buf, max_packet)
        if conf.protocol_level is not None:  # None: refine checks the chosen route's
            mqtt.check_protocol(packet, conf.protocol_name, conf.protocol_level)
    except socket.timeout:
        _short_read(s, buf, "timeout")
    except OSError as exc:
        _short_read(s, buf, exc.strerror or str(exc))
    except MalformedPacket as exc:
        plugin_exit(s, exc.reason, "%s" % exc)
    s.connect = packet
    if packet.client_id:  # an empty id leaves the var unset, as in APISIX
        s.vars["mqtt_client_id"] = packet.client_id
    if packet.username:  # likewise for gproxy's mqtt_username
        s.vars["mqtt_username"] = packet.username
    info = s.info
    info.client_id = packet.client_id_text
    info.username = packet.username_text
    info.protocol_level = packet.protocol_level
    s.keep_alive = packet.keep_alive
    if log.isEnabledFor(logging.INFO):  # (printable() costs more than the check)
        s.log(logging.INFO, "mqtt client id: %s", printable(packet.client_id))
    if conf.set_connect:
        return _rewrite(s, conf.set_connect, packet, buf)
    return buf


def accept_connect(s, conf, buf):
    """After a refine: the chosen route's mqtt-proxy ``conf`` over the CONNECT read
    (``s.connect``; ``buf``: every MQTT byte read), its protocol check in APISIX's
    order and wording, then its rewrite; returns the bytes to replay."""
    packet = s.connect
    try:
        mqtt.check_protocol(packet, conf.protocol_name, conf.protocol_level)
    except MalformedPacket as exc:
        plugin_exit(s, exc.reason, "%s" % exc)
    if conf.set_connect:
        return _rewrite(s, conf.set_connect, packet, buf)
    return buf


def _rewrite(s, set_connect, packet, buf):
    """The replay: the CONNECT with the fields ``set_connect`` names set from variables."""
    found = session_vars(s)
    values = {}
    for field, template in set_connect:
        unset = [m.group(1) or m.group(2) for m in _VAR.finditer(template)
                 if found.get(m.group(1) or m.group(2)) in (None, "", b"")]
        if unset:
            raise Reject("rewrite", logging.ERROR, "failed to rewrite the CONNECT: "
                         "variable %s is not set", unset[0])
        values[field] = _VAR.sub(lambda m: _text(found[m.group(1) or m.group(2)]),
                                 template).encode("utf-8", "surrogateescape")
    try:
        connect = mqttconnect.rewrite(buf[:packet.length], **values)
    except MalformedPacket as exc:
        plugin_exit(s, "malformed", str(exc))
    info = s.info
    if "client_id" in values:
        s.vars["mqtt_client_id"] = values["client_id"]
        info.client_id = values["client_id"].decode("utf-8", "backslashreplace")
    if "username" in values:
        s.vars["mqtt_username"] = values["username"]
        info.username = values["username"].decode("utf-8", "backslashreplace")
    s.log(logging.INFO, "mqtt connect rewritten: client id: %s", printable(info.client_id))
    return connect + buf[packet.length:]


def _text(value):
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def plugin_exit(s, reason, line):
    """The plugin's error line, then APISIX's exit line; the session ends."""
    s.log(logging.ERROR, "%s", line)
    raise Reject(reason, logging.WARNING, PLUGIN_EXIT, status=503)


def _short_read(s, buf, why):
    try:
        header_done = mqtt.packet_length(buf) is not None
    except MalformedPacket:
        header_done = False
    what = "the Connect Command" if header_done else "the msg header"
    plugin_exit(s, "timeout" if why == "timeout" else "closed",
                "failed to read %s: %s" % (what, why))
