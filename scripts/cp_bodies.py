"""The control-plane benchmark's objects: a big table, and hostile bodies.

``table(n, brokers)`` is n upstreams and n stream routes as a fleet would
write them (chash on the client id over the brokers, one route per
upstream, each on its own ``server_port`` so none takes the benchmark's
sessions).  ``HOSTILE`` lists the bodies that held gproxy's hub before
(each as ``(name, kind, id, text)``: sent as the Admin body, or put as the
etcd value), with the answer an APISIX-compatible gproxy gives.
"""

import json

HOST = "127.0.0.1"
MIB = 1024 * 1024


def upstream(n, brokers):
    return {"id": "u%d" % n, "type": "chash", "key": "mqtt_client_id", "name": "fleet-%d" % n,
            "nodes": [{"host": HOST, "port": p, "weight": 1} for p in brokers]}


def route(n):
    return {"id": "r%d" % n, "server_port": 20000 + n % 40000, "upstream_id": "u%d" % n,
            "plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}}}


def table(n, brokers):
    """``(method, path, body)`` for n upstreams, then n routes using them."""
    return ([("PUT", "/upstreams/u%d" % i, upstream(i, brokers)) for i in range(n)] +
            [("PUT", "/stream_routes/r%d" % i, route(i)) for i in range(n)])


def _pem_spaces():
    # 2,000 spaces took 2.6 s of the hub; 4,000 over 20 s; cert may be 64 KiB
    cert = "-----BEGIN CERTIFICATE-----" + " " * (64 * 1024 - 27)
    return {"id": "pem", "sni": "pem.example", "cert": cert, "key": "k" * 64}


def _ipv6(colons):
    # the IPv6 pattern was quadratic in Python's re: 8,000 colons took 1.7 s
    return {"id": "v6", "remote_addr": ":" * colons + "x",
            "plugins": {"mqtt-proxy": {"protocol_level": 4}}}


def _weights(kind, weights, ports):
    nodes = [{"host": HOST, "port": p, "weight": w} for p, w in zip(ports, weights)]
    return {"id": "w-%s" % kind, "type": kind, "key": "remote_addr", "nodes": nodes}


def _values(size):
    # a mebibyte of small values (a nodes map): 50 ms of the hub in the JSON decoder alone
    nodes, n, length = [], 0, 20
    while length < size - 40:
        item = '"10.%d.%d.%d:1883":1' % (n >> 16, (n >> 8) & 255, n & 255)
        nodes.append(item)
        length += len(item) + 1
        n += 1
    return '{"id":"many","nodes":{%s}}' % ",".join(nodes)


def _deep(depth):
    return '{"id":"deep","nodes":{},"metadata":' + "[" * depth + "]" * depth + "}"


def _certs(count):
    garbage = "-----BEGIN CERTIFICATE-----\n" + "QUJD" * 16000 + "\n-----END CERTIFICATE-----"
    return {"id": "certs", "sni": "c.example", "cert": garbage, "key": "k" * 64,
            "certs": [garbage] * count, "keys": ["k" * 64] * count}


def _big_ring():
    nodes = [{"host": "10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), "port": 1883,
              "weight": 1} for i in range(1000)]
    return {"id": "ring", "type": "chash", "key": "mqtt_client_id", "nodes": nodes}


def hostile(live, dead):
    """``(name, kind, id, body text, gproxy's status for the Admin PUT)``; ``live``
    and ``dead`` are ports: the round-robin upstream's billion-weight node is
    dead, so a client it takes is retried on the live one."""
    as_json = json.dumps
    return [
        ("PEM, 64 KiB of spaces", "ssls", "pem", as_json(_pem_spaces()), 400),
        ("IPv6, 127 colons", "stream_routes", "v6a", as_json(_ipv6(127)), 400),
        ("IPv6, 64 KiB of colons", "stream_routes", "v6b", as_json(_ipv6(65536)), 400),
        ("chash weight 100000 and 1", "upstreams", "w-chash",
         as_json(_weights("chash", [100000, 1], [live, dead])), 400),
        ("roundrobin weight 1e9 and 1", "upstreams", "w-roundrobin",
         as_json(_weights("roundrobin", [10 ** 9, 1], [dead, live])), 201),
        ("1,000 nodes (160,000 ring points)", "upstreams", "ring", as_json(_big_ring()), 201),
        ("1 MiB of small values", "upstreams", "many", _values(MIB), 400),
        ("nesting 5,000 deep", "upstreams", "deep", _deep(5000), 400),
        ("1 MiB of PEM text", "ssls", "certs", as_json(_certs(14)), 400),
    ]
