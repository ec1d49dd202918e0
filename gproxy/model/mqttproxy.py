"""The mqtt-proxy plugin's conf: the checks beyond its schema, and its runtime form.

APISIX's schema for the plugin (``resources.MQTT_PROXY_SCHEMA``) leaves
other keys open, so gproxy's extensions live inside it and a route that uses
them still loads in APISIX (which ignores them): ``websocket``
(docs/websocket.md), ``set_connect`` (docs/tls.md), and ``vars`` +
``priority`` + ``traffic_split`` (docs/routing.md).  ``check_mqtt_proxy``
runs after the schema at write time and returns the error text (the Admin
API prefixes it as APISIX prefixes a plugin's own check); ``MqttConf`` is
what a route keeps, with its ``vars`` compiled once.  Pure.
"""

from dataclasses import dataclass

from gproxy.model import expr
from gproxy.model.split import Split

#: What a route's ``vars`` may read (docs/routing.md): the CONNECT, and the
#: connection as APISIX's stream router sees it.  Values are nginx-style strings.
ROUTE_VARS = frozenset(("mqtt_client_id", "mqtt_username", "mqtt_protocol_name",
                        "mqtt_protocol_level", "tls_client_cn", "sni", "remote_addr",
                        "server_addr", "server_port"))


def check_mqtt_proxy(conf):
    """The first problem with a schema-valid mqtt-proxy ``conf``, or None."""
    ws = conf.get("websocket") or {}
    if conf.get("set_connect") and ws.get("enable", True) and ws.get("mode") == "passthrough":
        # A rewrite that could not apply is refused, not silently skipped: in
        # passthrough the client's frames are replayed as they came.
        return "set_connect cannot rewrite a CONNECT relayed in websocket passthrough mode"
    if "vars" in conf:
        try:
            expr.compile(conf["vars"], ROUTE_VARS)
        except expr.ExprError as exc:
            return "failed to validate the 'vars' expression: %s" % exc  # APISIX's words
    for entry in (conf.get("traffic_split") or {}).get("weighted_upstreams", ()):
        if "upstream" in entry:
            return ("traffic_split: an inline upstream is not supported, "
                    "name an upstream with upstream_id")
    return None


def split_upstream_ids(route_conf):
    """The upstream ids a stream route's traffic split names (its own upstream aside)."""
    conf = ((route_conf.get("plugins") or {}).get("mqtt-proxy") or {})
    entries = (conf.get("traffic_split") or {}).get("weighted_upstreams") or ()
    return [str(e["upstream_id"]) for e in entries
            if isinstance(e, dict) and e.get("upstream_id") is not None]


@dataclass(frozen=True)
class WebSocketConf:
    """gproxy's ``websocket`` option of mqtt-proxy (docs/websocket.md)."""

    enable: bool = True
    path: str = None         # None: any path
    origins: tuple = None    # lower-cased; None: any Origin
    passthrough: bool = False  # pass the upgrade and frames to a WebSocket broker

    @classmethod
    def from_conf(cls, conf):
        conf = conf or {}
        origins = conf.get("allow_origins")
        return cls(conf.get("enable", True), conf.get("path"),
                   None if origins is None else tuple(o.lower() for o in origins),
                   conf.get("mode") == "passthrough")


@dataclass(frozen=True)
class MqttConf:
    """A route's mqtt-proxy conf.  ``protocol_level`` None: the CONNECT is read
    but not checked (the preread of a session whose route its ``vars`` decide)."""

    protocol_name: str
    protocol_level: int
    websocket: WebSocketConf = WebSocketConf()
    set_connect: tuple = ()  # ((field, "$var template"), ...): gproxy's CONNECT rewrite
    vars: expr.Expr = None   # None: no vars (or an empty list): the route is a fallback
    priority: int = 0
    split: Split = None

    @classmethod
    def from_plugin(cls, plugin):
        rule = plugin.get("vars")
        split = plugin.get("traffic_split")
        return cls(plugin.get("protocol_name", "MQTT"), plugin["protocol_level"],
                   WebSocketConf.from_conf(plugin.get("websocket")),
                   tuple(sorted((plugin.get("set_connect") or {}).items())),
                   expr.compile(rule, ROUTE_VARS) if rule else None,
                   plugin.get("priority", 0), Split(split) if split else None)


#: The preread of a session whose candidates differ: any CONNECT, any WebSocket
#: path and origin; the chosen route's own conf is applied after the refine.
PREREAD_ANY = MqttConf(None, None)
