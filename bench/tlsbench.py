"""The TLS workloads: MQTT over TLS through each proxy that terminates TLS.

* ``tlsconn``: a fresh TCP connection, a full TLS handshake (no session
  resumption), CONNECT, CONNACK, DISCONNECT, close; connections per second,
  as ``conn`` measures for plain TCP.  The cost is mostly OpenSSL's on both
  sides (an RSA-2048 signature per handshake on the proxy).
* ``tlstput16k``: one TLS publisher and one TLS subscriber through the proxy,
  16 KiB messages, MB/s at the subscriber (as ``tput16k``).

The certificates (a CA and an RSA-2048 server certificate for ``SNI``) are
made at start-up with trustme (the test extra); HAProxy (``bind ... ssl
crt``), nginx (``listen ... ssl``) and gproxy (a ``tls: true`` listener, the
certificate from the ``ssls`` resource) all serve the same one on a listener
of their own (``target.tls_port``), added to their usual config by the
functions below.  Targets without one (``direct``) are skipped.
"""

import os
import ssl

from bench import configs

SNI = "mqtt.bench.example"


class Pki:
    """Files and PEM text of the benchmark's CA and server certificate."""

    def __init__(self, run_dir):
        import trustme  # only needed when a TLS workload runs
        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        leaf = ca.issue_cert(SNI, key_type=trustme.KeyType.RSA)
        self.sni = SNI
        self.cert_pem = b"".join(p.bytes() for p in leaf.cert_chain_pems).decode()
        self.key_pem = leaf.private_key_pem.bytes().decode()
        self.ca_file = os.path.join(run_dir, "bench-ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        self.crt_file = os.path.join(run_dir, "bench-server.crt")
        self.key_file = os.path.join(run_dir, "bench-server.key")
        self.pem_file = os.path.join(run_dir, "bench-server.pem")  # HAProxy: cert + key
        for path, text in ((self.crt_file, self.cert_pem), (self.key_file, self.key_pem),
                           (self.pem_file, self.cert_pem + self.key_pem)):
            with open(path, "w") as fh:
                fh.write(text)
            os.chmod(path, 0o600)
        self.client = (self.ca_file, SNI)


def client_context(tls):
    """The load generator's context: verifies the proxy's certificate for ``SNI``."""
    return ssl.create_default_context(cafile=tls[0])


# -- each target's TLS listener, added to its usual config -------------------------

def haproxy(conf, pki, port):
    """HAProxy terminating TLS (``bind ... ssl crt``), same checks, the broker backend."""
    if not pki:
        return conf
    return conf + """
frontend mqtts
    bind 127.0.0.1:%d ssl crt %s
    tcp-request inspect-delay 5s
    tcp-request content reject unless { req.payload(0,0),mqtt_is_valid }
    default_backend brokers
""" % (port, pki.pem_file)


def nginx(conf, pki, port):
    """An nginx stream server with ``listen ... ssl``, proxying to the broker."""
    if not pki:
        return conf
    server = """    server {
        listen 127.0.0.1:%d ssl;
        ssl_certificate %s;
        ssl_certificate_key %s;
        proxy_pass brokers;
        proxy_connect_timeout 5s;
        proxy_timeout 600s;
    }
}
""" % (port, pki.crt_file, pki.key_file)
    return conf.rstrip()[:-1] + server  # inside the stream block


def gproxy(conf, pki, port):
    """One more listener: ``{addr, tls: true}``."""
    if not pki:
        return conf
    return conf.replace("    tcp:\n", '    tcp:\n      - {addr: "127.0.0.1:%d", tls: true}\n'
                        % port, 1)


def gproxy_routes(store, pki, port, broker_port):
    """The certificate as an ``ssls`` object, and a route for the TLS listener."""
    if not pki:
        return store
    route = configs.gproxy_route(3, port, "127.0.0.1", broker_port)
    ssls = "ssls:\n  - id: 1\n    snis: [%s]\n    cert: |\n%s    key: |\n%s" % (
        pki.sni, _indent(pki.cert_pem), _indent(pki.key_pem))
    return ssls + store.replace("#END\n", route + "#END\n")


def _indent(text, pad="      "):
    return "".join(pad + line + "\n" for line in text.strip().splitlines())


# -- the workloads ------------------------------------------------------------------

def tls_conn_rate(target, broker, opts, prefix):
    if getattr(target, "tls_port", None) is None:
        return {"skipped": "no TLS listener: the TLS workloads do not apply"}
    from bench import workloads
    out = workloads.conn_rate(target, broker, opts, prefix, tls=opts.pki.client)
    return {"tls" + k: v for k, v in out.items()}


def tls_throughput(target, broker, opts, prefix):
    if getattr(target, "tls_port", None) is None:
        return {"skipped": "no TLS listener: the TLS workloads do not apply"}
    from bench import workloads
    return workloads.throughput(target, broker, opts, prefix, 16 * 1024, "tputtls16k",
                                tls=opts.pki.client)


def tls_idle(target, broker, opts, prefix):
    """Memory per idle TLS session (at most 2,000 of them: each costs a handshake).

    The target is restarted first: memory the earlier workloads freed inside
    the process would be reused and hide the growth.
    """
    if getattr(target, "tls_port", None) is None:
        return {"skipped": "no TLS listener: the TLS workloads do not apply"}
    from bench import workloads
    target.stop()
    target.start()
    return workloads.idle(target, broker, opts, prefix, tls=opts.pki.client,
                          count=min(opts.idle_conns, 2000), key="tlsidle")


WORKLOADS = {"tlsconn": tls_conn_rate, "tlstput16k": tls_throughput, "tlsidle": tls_idle}
