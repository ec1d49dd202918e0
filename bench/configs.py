"""Config file text for each process under test: pure functions, no I/O.

Every listener is on ``host``; values that depend on the machine (fd limit)
are computed by the caller and passed in.
"""


def mosquitto(host, port):
    return "\n".join([
        "listener %d %s" % (port, host),
        "allow_anonymous true",
        "max_connections -1",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "connection_messages false",
        "set_tcp_nodelay true",
        # The windowed workloads bound what is in flight themselves (see
        # workloads.throughput); flood16k does not, and this bound is the one
        # the independent harness gave mosquitto.
        "max_queued_messages 100000",
        ""])


def haproxy(host, port, broker_port, maxconn, nofile, order_port, sink_port):
    return """global
    nbthread 1
    maxconn %(maxconn)d
    ulimit-n %(nofile)d

defaults
    mode tcp
    maxconn %(maxconn)d
    timeout connect 5s
    timeout client 600s
    timeout server 600s

frontend mqtt
    bind %(host)s:%(port)d
    tcp-request inspect-delay 5s
    tcp-request content reject unless { req.payload(0,0),mqtt_is_valid }
    default_backend brokers

backend brokers
    balance hash req.payload(0,0),mqtt_field_value(connect,client_identifier)
    hash-type consistent
    server broker1 %(host)s:%(broker)d

frontend order
    bind %(host)s:%(order)d
    tcp-request inspect-delay 5s
    tcp-request content reject unless { req.payload(0,0),mqtt_is_valid }
    default_backend sink

backend sink
    balance hash req.payload(0,0),mqtt_field_value(connect,client_identifier)
    hash-type consistent
    server sink1 %(host)s:%(sink)d
""" % {"maxconn": maxconn, "nofile": nofile, "host": host, "port": port,
       "broker": broker_port, "order": order_port, "sink": sink_port}


def nginx(host, port, broker_port, module, run_dir, nofile, worker_connections, order_port,
          sink_port):
    return """load_module %(module)s;
worker_processes 1;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx.log warn;
worker_rlimit_nofile %(nofile)d;
events {
    worker_connections %(wc)d;
}
stream {
    upstream brokers {
        server %(host)s:%(broker)d;
    }
    server {
        listen %(host)s:%(port)d;
        proxy_pass brokers;
        proxy_connect_timeout 5s;
        proxy_timeout 600s;
    }
    upstream sink {
        server %(host)s:%(sink)d;
    }
    server {
        listen %(host)s:%(order)d;
        proxy_pass sink;
        proxy_connect_timeout 5s;
        proxy_timeout 600s;
    }
}
""" % {"module": module, "dir": run_dir, "nofile": nofile, "wc": worker_connections,
       "host": host, "port": port, "broker": broker_port, "order": order_port,
       "sink": sink_port}


def gproxy(host, port, admin_port, order_port):
    return """apisix:
  stream_proxy:
    tcp:
      - "%(host)s:%(port)d"
      - "%(host)s:%(order)d"
deployment:
  admin:
    admin_listen:
      ip: %(host)s
      port: %(admin)d
nginx_config:
  error_log_level: warn
gproxy:
  max_connections: 20000
  store:
    backend: file
    path: apisix.yaml
""" % {"host": host, "port": port, "admin": admin_port, "order": order_port}


def gproxy_route(route_id, server_port, host, node_port, extra=""):
    """One store-file stream route: mqtt-proxy on ``server_port``, chash on the client id.

    ``extra``: more lines of the mqtt-proxy conf (``vars``, ``priority``), indented.
    """
    return """  - id: %s
    server_port: %d
    plugins:
      mqtt-proxy:
        protocol_name: MQTT
        protocol_level: 4
%s    upstream:
      type: chash
      key: mqtt_client_id
      nodes:
        - host: %s
          port: %d
          weight: 1
""" % (route_id, server_port, extra, host, node_port)


def gproxy_routes(host, port, broker_port, order_port, sink_port):
    """The store file: per listener one mqtt-proxy stream route, chash on the MQTT client id.

    ``port`` leads to the broker, ``order_port`` to the order probe's sink.
    """
    return "stream_routes:\n" + gproxy_route(1, port, host, broker_port) + \
        gproxy_route(2, order_port, host, sink_port) + "#END\n"


#: The load's client ids all start with "c" (run.py, conncost.py): a client-id regex
#: route takes them, so every CONNECT is routed by a rule evaluated on it.
BENCH_CLIENTS = '[["mqtt_client_id", "~~", "^c"]]'


def gproxy_vars_routes(host, port, broker_port, order_port, sink_port, tenants=1):
    """The store file for routes chosen by the CONNECT (docs/routing.md), on ``port``:
    ``tenants`` routes by username (``tenant-<n>``, indexed, priority 10, none of them
    the load's), the load's route by a client-id regex, and a fallback without vars."""
    routes = "".join(gproxy_route('"tenant-%d"' % n, port, host, broker_port,
                                  '        vars: [["mqtt_username", "==", "tenant-%d"]]\n'
                                  '        priority: 10\n' % n) for n in range(tenants))
    routes += gproxy_route('"bench"', port, host, broker_port,
                           "        vars: %s\n" % BENCH_CLIENTS)
    routes += gproxy_route('"fallback"', port, host, broker_port)
    return "stream_routes:\n" + routes + gproxy_route(2, order_port, host, sink_port) + \
        "#END\n"
