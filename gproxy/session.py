"""One client connection: match -> preread CONNECT -> balance -> dial -> replay -> relay.

``Proxy.handle(sock, addr)`` is the StreamServer handler.  It owns the client
socket and the upstream socket it dials until it hands both to the relay
(``relay.RelayHub``), which then owns and closes them; if anything fails
before that, the handler closes what it opened and returns (gevent closes the
client socket).  Errors end this one session and are logged as one line;
nothing here can touch the listener.  Log lines APISIX users grep for keep
APISIX's exact wording (docs/apisix-behaviour.md §1-2, §5); CONNECT payloads
are never logged.
"""

import logging
import re
import socket
import time

from gevent import socket as gsocket

from gproxy import mqtt, netio
from gproxy.balancer import Node
from gproxy.errors import MalformedPacket, NoUpstream
from gproxy.registry import Registry
from gproxy.relay import RelayHub, shutdown
from gproxy.routes import DEFAULT_CONNECT_TIMEOUT, DEFAULT_PROXY_TIMEOUT, RouteTable, is_ip

log = logging.getLogger("gproxy.session")

RECV_SIZE = 4096


class Settings:
    """The per-session knobs from config (seconds and bytes)."""

    def __init__(self, preread_timeout=30.0, max_packet=mqtt.DEFAULT_MAX_PACKET,
                 connect_timeout=None, idle_timeout=None, max_connections=None):
        self.preread_timeout = preread_timeout
        self.max_packet = max_packet
        self.connect_timeout = connect_timeout  # None: the upstream's or nginx's default
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["gproxy.preread.timeout"], cfg["gproxy.preread.buffer_size"],
                   cfg["gproxy.proxy.connect_timeout"], cfg["gproxy.proxy.timeout"],
                   cfg["gproxy.max_connections"])


def plain_ip(ip):
    """``::ffff:1.2.3.4`` (an IPv4 client on a dual-stack socket) as ``1.2.3.4``."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class Proxy:
    """The data path shared by every listener: route table, registry, relays, settings."""

    def __init__(self, table=None, registry=None, settings=None, relays=None):
        self.table = table if table is not None else RouteTable()
        self.registry = registry if registry is not None else Registry()  # empty is falsy
        self.settings = settings if settings is not None else Settings()
        self.relays = relays if relays is not None else RelayHub()

    def handle(self, sock, addr, server=None):
        """One accepted client. ``server`` is the listener's address when it is
        bound to one IP; on a wildcard listener the local address is looked up."""
        if server is None:
            try:
                server = sock.getsockname()
            except OSError:
                return  # the client left before we looked
            server = (plain_ip(server[0]), server[1])
        info = self.registry.new_session((plain_ip(addr[0]), addr[1]), server)
        Session(self, sock, info).run()

    def handler_for(self, bound):
        """The StreamServer handler for a listener bound to ``(ip, port)``."""
        if bound[0] in ("0.0.0.0", "::"):
            return self.handle
        server = (plain_ip(bound[0]), bound[1])
        return lambda sock, addr: self.handle(sock, addr, server)


class Session:
    """The life of one accepted connection, up to the hand-off to the relay."""

    def __init__(self, proxy, sock, info):
        self.proxy = proxy
        self.sock = sock
        self.info = info
        self.upstream_sock = None
        self.client_id = b""  # raw bytes from the CONNECT: the chash key
        self.relay = None

    def log(self, level, msg, *args):
        if log.isEnabledFor(level):
            info = self.info
            log.log(level, msg + ", client: %s:%d, server: %s:%d, session: %s",
                    *args, info.client_addr, info.client_port, info.server_addr,
                    info.server_port, info.id)

    def reject(self, reason, level, msg, *args):
        self.proxy.registry.reject(reason)
        self.log(level, msg, *args)

    def close(self):
        """Registry closer: end this session from another greenlet or the Admin API."""
        self.info.state = "closing"
        if self.relay is not None:
            self.relay.abort("disconnected")
            return
        for s in (self.sock, self.upstream_sock):
            if s is not None:
                shutdown(s, socket.SHUT_RDWR)

    def run(self):
        info = self.info
        registry = self.proxy.registry
        table = self.proxy.table  # one snapshot for the whole session
        route = table.match(info.server_addr, info.server_port, info.client_addr)
        if route is None:
            # Close before reading: a client that already sent bytes gets an RST.
            self.reject("no_route", logging.INFO, "match(): not hit any route")
            return
        limit = self.proxy.settings.max_connections
        if limit and len(registry) >= limit:
            self.reject("limit", logging.ERROR, "too many sessions (max_connections %d)", limit)
            return
        info.route_id = route.id
        registry.add(info, self.close)
        try:
            self._proxy(table, route)
        finally:
            if self.relay is None:  # never handed off: this greenlet cleans up
                if self.upstream_sock is not None:
                    self.upstream_sock.close()
                info.state = "closed"
                registry.remove(info)

    def _proxy(self, table, route):
        upstream, err = table.upstream_for(route)
        if err:
            self.reject("no_upstream", logging.ERROR, err)
            return
        buf = b""
        if route.mqtt is not None:
            buf = self._preread(route.mqtt)
            if buf is None:
                return
        try:
            self._dial(upstream, self._hash_key(upstream))
        except NoUpstream as exc:
            self.reject("upstream_unavailable", logging.ERROR, str(exc))
            return
        try:
            if buf:
                # every peeked byte, unchanged
                netio.sendall(self.upstream_sock, buf, self.proxy.settings.idle_timeout)
                self.info.bytes_in += len(buf)
        except OSError as exc:
            self.log(logging.ERROR, "failed to replay the CONNECT upstream: %s",
                     exc.strerror or exc)
            return
        if self.info.state == "closing":
            return  # an operator closed it while we dialled
        self._hand_off(upstream.idle_timeout or self.proxy.settings.idle_timeout
                       or DEFAULT_PROXY_TIMEOUT)

    def _hand_off(self, idle):
        """Give both sockets to the relay; this greenlet then returns."""
        client = netio.adopt(self.sock)  # the server's close() then finds nothing to close
        upstream = netio.adopt(self.upstream_sock)
        self.upstream_sock = None
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.info.state = "relaying"
        self.relay = self.proxy.relays.start(client, upstream, self.info, self._relay_done, idle)

    def _relay_done(self, relay):
        info = self.info
        info.state = "closed"
        self.proxy.registry.remove(info)
        self.log(logging.INFO, "session closed: node=%s bytes_in=%d bytes_out=%d "
                 "duration=%.3fs reason=%s", info.node, info.bytes_in, info.bytes_out,
                 time.time() - info.connected_at, relay.reason or "eof")

    def _preread(self, conf):
        """Buffer the whole CONNECT, check it; the bytes, or None after rejecting."""
        settings = self.proxy.settings
        deadline = time.monotonic() + settings.preread_timeout
        buf = b""
        packet = None
        try:
            while packet is None:
                chunk = netio.recv(self.sock, RECV_SIZE, deadline)
                if not chunk:
                    return self._short_read(buf, "closed")
                buf += chunk
                packet = mqtt.parse_connect(buf, settings.max_packet)
            mqtt.check_protocol(packet, conf.protocol_name, conf.protocol_level)
        except socket.timeout:
            return self._plugin_exit(self._short_read(buf, "timeout"))
        except OSError as exc:
            return self._plugin_exit(self._short_read(buf, exc.strerror or str(exc)))
        except MalformedPacket as exc:
            self.reject(exc.reason, logging.ERROR, "%s", exc)
            return self._plugin_exit(None)
        self.client_id = packet.client_id
        self.info.client_id = packet.client_id_text
        self.info.protocol_level = packet.protocol_level
        self.log(logging.INFO, "mqtt client id: %s", self.info.client_id)
        return buf

    def _plugin_exit(self, result):
        # APISIX's run_plugin logs this after any mqtt-proxy rejection (§2).
        self.log(logging.WARNING, "mqtt-proxy exits with status code 503")
        return result

    def _short_read(self, buf, why):
        try:
            header_done = mqtt.packet_length(buf) is not None
        except MalformedPacket:
            header_done = False
        what = "the Connect Command" if header_done else "the msg header"
        self.reject("timeout" if why == "timeout" else "closed", logging.ERROR,
                    "failed to read %s: %s", what, why)
        return None

    def _vars(self):
        info = self.info
        found = {"remote_addr": info.client_addr, "remote_port": str(info.client_port),
                 "server_addr": info.server_addr, "server_port": str(info.server_port)}
        if self.client_id:  # an empty id leaves the var unset, as in APISIX
            found["mqtt_client_id"] = self.client_id
        return found

    def _hash_key(self, upstream):
        if upstream.type != "chash" or len(upstream.nodes) == 1:
            return None  # one node skips the balancer, and so the key (APISIX)
        found = self._vars()
        value = None
        if upstream.hash_on == "vars":
            value = found.get(upstream.key)
        elif upstream.hash_on == "vars_combinations" and upstream.key:
            value = re.sub(r"\$(\w+)", lambda m: _text(found.get(m.group(1), "")), upstream.key)
        if value is None or value == "":
            self.log(logging.WARNING, "chash_key fetch is nil, use default chash_key "
                     "remote_addr: %s", self.info.client_addr)
            value = self.info.client_addr
        return value if isinstance(value, bytes) else value.encode()

    def _resolve(self, upstream):
        if not upstream.needs_dns:
            return None
        nodes = []
        for node in upstream.nodes:
            if is_ip(node.host):
                nodes.append(node)
                continue
            try:
                infos = gsocket.getaddrinfo(node.host, node.port, 0, socket.SOCK_STREAM)
            except OSError as exc:
                self.log(logging.ERROR, "failed to parse domain: %s, error: %s", node.host, exc)
                continue
            nodes.append(Node(infos[0][4][0], node.port, node.weight, node.priority, node.host))
        if not nodes:
            raise NoUpstream("failed to set upstream: no valid upstream node")
        return nodes

    def _dial(self, upstream, key):
        """Connect to the first node that answers; sets ``upstream_sock``."""
        balancer = upstream.balancer(self._resolve(upstream))
        if upstream.type not in ("roundrobin", "chash") and len(balancer.nodes) > 1:
            raise NoUpstream("failed to pick server: invalid balancer type: %s" % upstream.type)
        timeout = (upstream.connect_timeout or self.proxy.settings.connect_timeout
                   or DEFAULT_CONNECT_TIMEOUT)
        deadline = time.monotonic() + upstream.retry_timeout if upstream.retry_timeout else None
        self.info.state = "connecting"
        tried = []
        for node in balancer.candidates(key, upstream.tries(len(balancer.nodes))):
            if deadline and tried and time.monotonic() > deadline:
                break
            tried.append(node.addr)
            self.log(logging.INFO, "proxy request to %s", node.addr)
            conn = netio.connect(node.dial_host, node.port, timeout)
            if isinstance(conn, OSError):
                self.log(logging.ERROR, "connect() failed (%s) while connecting to upstream, "
                         "upstream: \"%s\"", _errtext(conn), node.addr)
                continue
            self.upstream_sock = conn
            self.info.node = node.addr
            return
        if not tried:
            raise NoUpstream("failed to pick server: no node available")
        raise NoUpstream("all upstream servers tried: %s" % ", ".join(tried))


def _text(value):
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _errtext(exc):
    if isinstance(exc, socket.timeout):
        return "110: Connection timed out"
    return "%s: %s" % (exc.errno, exc.strerror) if exc.errno else str(exc)
