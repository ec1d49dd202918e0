"""A real etcd (Debian's ``etcd-server``) for the etcd store's tests.

One single-member etcd on free loopback ports with its own data directory,
started with ``subprocess.Popen`` and stopped by its PID; ``restart()`` brings
the same member back on the same ports and data.  ``ctl(...)`` runs
``etcdctl`` (Debian's ``etcd-client``) against it.
"""

import json
import os
import shutil
import subprocess

from tests.integration.conftest import HOST, free_port, stop_process, wait_listening, wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def available():
    return os.access(ETCD, os.X_OK) and os.access(ETCDCTL, os.X_OK)


class Etcd:
    """One etcd member on loopback."""

    def __init__(self, directory):
        self.dir = directory
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = "http://%s:%d" % (HOST, self.client_port)
        self.log_path = os.path.join(directory, "etcd.log")
        self.proc = None

    def start(self):
        peer = "http://%s:%d" % (HOST, self.peer_port)
        args = [ETCD, "--name", "gproxy-test", "--data-dir", os.path.join(self.dir, "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "gproxy-test=" + peer]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        wait_listening(self.client_port, self.proc, timeout=20, what="etcd")
        healthy = wait_until(lambda: self._healthy(), 20, interval=0.1)
        assert healthy, "etcd never became healthy; log:\n" + self.log()[-4000:]
        return self

    def _healthy(self):
        out = subprocess.run([ETCDCTL, "--endpoints", self.url, "endpoint", "health"],
                             capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, ETCDCTL_API="3"))
        return out.returncode == 0

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
        out = subprocess.run([ETCDCTL, "--endpoints", self.url] + list(args),
                             capture_output=True, text=True, timeout=20,
                             env=dict(os.environ, ETCDCTL_API="3"))
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
