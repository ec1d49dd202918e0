"""A real etcd (Debian's ``etcd-server``) for the etcd store's tests.

One single-member etcd on free loopback ports with its own data directory,
started with ``subprocess.Popen`` and stopped by its PID; ``restart()`` brings
the same member back on the same ports and data.  ``ctl(...)`` runs
``etcdctl`` (Debian's ``etcd-client``) against it.

``Etcd(directory, ca=trustme.CA(), names=[...])`` serves clients over TLS
only, with a server certificate for ``names`` and client certificates
required (``--client-cert-auth``); ``client_cert``/``client_key``/``ca_file``
are the files a client needs.  ``enable_auth(user, password, prefix)`` turns
on etcd's authentication with a user that may read and write ``prefix``.
"""

import json
import os
import re
import shutil
import subprocess

import pytest

from tests import needs
from tests.integration.conftest import HOST, free_port, stop_process, wait_listening, wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def available():
    return os.access(ETCD, os.X_OK) and os.access(ETCDCTL, os.X_OK)


NEEDS = "needs etcd and etcdctl (apt-get install etcd-server etcd-client)"
#: ``pytestmark`` entry for modules that need etcd: skipped without it on a
#: developer's machine; never in CI (tests/needs.py), where ``Etcd`` then fails
#: with the same message instead of letting the run pass untested.
needs_etcd = pytest.mark.skipif(not available() and not needs.in_ci(), reason=NEEDS)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """One plain-HTTP etcd for the module (import it into the test module)."""
    server = Etcd(str(tmp_path_factory.mktemp("etcd"))).start()
    yield server
    server.stop()


@pytest.fixture
def prefix(request):
    """A key prefix of the test's own."""
    return "/gproxy-test/" + re.sub(r"\W", "-", request.node.name)


class Etcd:
    """One etcd member on loopback."""

    def __init__(self, directory, ca=None, names=(HOST,)):
        needs.require(available(), NEEDS)
        self.dir = directory
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = "%s://%s:%d" % ("https" if ca else "http", HOST, self.client_port)
        self.log_path = os.path.join(directory, "etcd.log")
        self.proc = None
        self.tls_args, self.ctl_tls = [], []
        self.root = None  # "root:<password>" once auth is on
        if ca is not None:
            self._certificates(ca, names)

    def _certificates(self, ca, names):
        def path(name):
            return os.path.join(self.dir, name)
        server, client = ca.issue_cert(*names), ca.issue_cert("gproxy-test-client")
        ca.cert_pem.write_to_path(path("ca.pem"))
        server.cert_chain_pems[0].write_to_path(path("server.pem"))
        server.private_key_pem.write_to_path(path("server.key"))
        client.cert_chain_pems[0].write_to_path(path("client.pem"))
        client.private_key_pem.write_to_path(path("client.key"))
        self.ca_file, self.client_cert, self.client_key = (
            path("ca.pem"), path("client.pem"), path("client.key"))
        self.tls_args = ["--cert-file", path("server.pem"), "--key-file", path("server.key"),
                         "--trusted-ca-file", path("ca.pem"), "--client-cert-auth"]
        self.ctl_tls = ["--cacert", path("ca.pem"), "--cert", self.client_cert,
                        "--key", self.client_key]
        if HOST not in names:  # the certificate does not name the address etcdctl dials
            self.ctl_tls.append("--insecure-skip-tls-verify")

    def start(self):
        peer = "http://%s:%d" % (HOST, self.peer_port)
        args = [ETCD, "--name", "gproxy-test", "--data-dir", os.path.join(self.dir, "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "gproxy-test=" + peer] + self.tls_args
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        wait_listening(self.client_port, self.proc, timeout=20, what="etcd")
        healthy = wait_until(lambda: self._healthy(), 20, interval=0.1)
        assert healthy, "etcd never became healthy; log:\n" + self.log()[-4000:]
        return self

    def _healthy(self):
        return self._run(["endpoint", "health"], timeout=10).returncode == 0

    def _run(self, args, timeout=20):
        auth = ["--user", self.root] if self.root else []
        return subprocess.run([ETCDCTL, "--endpoints", self.url] + self.ctl_tls + auth + args,
                              capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, ETCDCTL_API="3"))

    def enable_auth(self, user, password, prefix):
        """etcd's authentication on, with ``user`` allowed to read and write ``prefix``."""
        root = "root-password-for-tests"
        for args in (["user", "add", "root:" + root], ["user", "grant-role", "root", "root"],
                     ["user", "add", "%s:%s" % (user, password)], ["role", "add", "gproxy"],
                     ["role", "grant-permission", "gproxy", "--prefix=true", "readwrite",
                      prefix + "/"],
                     ["user", "grant-role", user, "gproxy"], ["auth", "enable"]):
            self.ctl(*args)
        self.root = "root:" + root

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def log(self):
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def ctl(self, *args, check=True):
        out = self._run(list(args))
        if check:
            assert out.returncode == 0, out.stderr
        return out.stdout

    def get(self, key):
        """``{key, create_revision, mod_revision, value}`` of one key (values decoded)."""
        import base64
        data = json.loads(self.ctl("get", key, "-w", "json"))
        kvs = data.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return {"key": base64.b64decode(kv["key"]).decode(),
                "create_revision": kv["create_revision"], "mod_revision": kv["mod_revision"],
                "value": json.loads(base64.b64decode(kv["value"]))}

    def etcd_config(self, prefix="/apisix"):
        """The config.yaml keys that put a gproxy on this etcd."""
        return {"deployment": {"role": "traditional",
                               "role_traditional": {"config_provider": "etcd"},
                               "etcd": {"host": [self.url], "prefix": prefix, "timeout": 5}}}
