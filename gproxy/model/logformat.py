"""nginx's ``log_format`` for the stream access log: compile, escape, render (pure).

A format is literal text with ``$name`` or ``${name}`` variables (nginx's
ngx_stream_log_module).  ``compile_format`` checks every name against the
variables the caller can supply and raises ValueError naming the first it
cannot (nginx refuses to start on an unknown variable).  ``render`` fills in
values (text, bytes or None) with nginx's escaping of variable values, never
of the literal text:

* ``default``: ``"``, ``\\``, bytes below 0x20 and from 0x7f up become
  ``\\xHH`` (upper-case hex); an unset value is ``-``;
* ``json``: ``"`` and ``\\`` get a backslash, ``\\n \\r \\t \\b \\f`` their
  short forms, other bytes below 0x20 ``\\u00HH``; bytes from 0x7f up pass as
  they are; an unset value is empty;
* ``none``: values as they are (nginx's third mode).

The result is bytes: one line, without its newline.
"""

import re

ESCAPES = ("default", "json", "none")
#: The variables a stream access log format may name: nginx's stream variables,
#: APISIX's ``mqtt_client_id`` and ``route_id``, gproxy's own (docs/operations.md).
STREAM_VARIABLES = (
    "remote_addr", "remote_port", "server_addr", "server_port", "protocol", "status",
    "bytes_sent", "bytes_received", "session_time", "time_local", "time_iso8601", "msec",
    "connection", "pid", "hostname", "upstream_addr", "upstream_bytes_sent",
    "upstream_bytes_received", "ssl_server_name", "route_id", "mqtt_client_id",
    "mqtt_username", "mqtt_protocol_level", "tls_client_cn", "session_id")
#: Variables whose values are ASCII digits, addresses or fixed words: nothing to escape.
PLAIN = frozenset((
    "remote_addr", "remote_port", "server_addr", "server_port", "protocol", "status",
    "bytes_sent", "bytes_received", "session_time", "time_local", "time_iso8601", "msec",
    "connection", "pid", "upstream_addr", "upstream_bytes_sent", "upstream_bytes_received",
    "route_id", "mqtt_protocol_level", "session_id"))
_VAR = re.compile(rb"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")
_DEFAULT = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')
_JSON = re.compile(rb'[\x00-\x1f"\\]')
_JSON_SHORT = {0x22: b'\\"', 0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t",
               0x08: b"\\b", 0x0C: b"\\f"}


def _default_byte(m):
    return b"\\x%02X" % m.group()[0]


def _json_byte(m):
    byte = m.group()[0]
    return _JSON_SHORT.get(byte) or b"\\u00%02X" % byte


def escape(value, mode):
    """One variable's value as the log shows it (``value``: bytes, str or None)."""
    if value is None:
        return b"-" if mode == "default" else b""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if mode == "default":
        return _DEFAULT.sub(_default_byte, value)
    if mode == "json":
        return _JSON.sub(_json_byte, value)
    return value


class LogFormat:
    """A compiled format: literal pieces and the variable names between them."""

    def __init__(self, literals, names, mode, plain=()):
        self.literals = literals  # len(names) + 1 byte strings
        self.names = names
        self.mode = mode
        # per variable: its value needs escaping (False: ASCII that never does)
        self._steps = tuple((name, name not in plain, literal)
                            for name, literal in zip(names, literals[1:]))

    def render(self, values):
        """The line for ``values`` (a mapping or a callable: name -> value)."""
        get = values if callable(values) else values.get
        return self.bind({name: (lambda name=name: get(name)) for name in self.names})()

    def bind(self, getters):
        """``line(*args)``: the line with each variable's value ``getters[name](*args)``."""
        steps = tuple((getters[name], needs, literal) for name, needs, literal in self._steps)
        first, mode = self.literals[0], self.mode

        def line(*args):
            out = [first]
            for get, needs, literal in steps:
                value = get(*args)
                if needs or value is None:
                    out.append(escape(value, mode))
                else:
                    out.append(value.encode("ascii", "backslashreplace"))
                out.append(literal)
            return b"".join(out)
        return line


def compile_format(text, known, mode="default", plain=()):
    """A LogFormat for ``text``; ValueError names an unknown variable or escape.

    ``plain``: names whose values are never escaped (they cannot need it)."""
    if mode not in ESCAPES:
        raise ValueError("unknown escape %r (default, json or none)" % mode)
    raw = text.encode("utf-8").rstrip(b"\r\n")  # a YAML block scalar ends with a newline
    literals, names, pos = [], [], 0
    for m in _VAR.finditer(raw):
        name = (m.group(1) or m.group(2)).decode()
        if name not in known:
            raise ValueError('unknown "%s" variable' % name)
        literals.append(raw[pos:m.start()])
        names.append(name)
        pos = m.end()
    literals.append(raw[pos:])
    return LogFormat(literals, tuple(names), mode, plain)
