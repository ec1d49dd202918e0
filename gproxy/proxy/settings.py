"""The data path's knobs, read once from config (seconds and bytes)."""

from gproxy.protocols import mqtt


class Settings:
    """Per-session settings shared by every listener of a process."""

    def __init__(self, preread_timeout=30.0, max_packet=mqtt.DEFAULT_MAX_PACKET,
                 connect_timeout=None, idle_timeout=None, max_connections=None,
                 tls_handshake_timeout=60.0, fallback_sni=None):
        self.preread_timeout = preread_timeout
        self.max_packet = max_packet
        self.connect_timeout = connect_timeout  # None: the upstream's or nginx's default
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.tls_handshake_timeout = tls_handshake_timeout  # nginx's ssl_handshake_timeout
        self.fallback_sni = fallback_sni  # APISIX's apisix.ssl.fallback_sni

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["gproxy.preread.timeout"], cfg["gproxy.preread.buffer_size"],
                   cfg["gproxy.proxy.connect_timeout"], cfg["gproxy.proxy.timeout"],
                   cfg["gproxy.max_connections"], cfg["gproxy.tls.handshake_timeout"],
                   cfg["apisix.ssl.fallback_sni"])
