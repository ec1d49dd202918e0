"""The fleet's keys on etcd: JSON values under the store's prefix, off the hub.

``FleetKV`` wraps the etcd store's cluster (endpoints, TLS, auth) with what
the registry and the jobs need: put a JSON value (on a lease), read one key
or every key under a path as ``{path: (value, lease)}``, delete, and the
lease calls.  Paths are relative to the prefix (``/data_plane/...``).
Every call blocks only the calling greenlet (``blocking``).
"""

import json
import logging

from gproxy.model import jsontext
from gproxy.store.etcdclient import blocking, unb64

log = logging.getLogger("gproxy.fleet")


def _json(text):
    """A JSON object of ours, decoded within bounds (etcd is shared: anyone may write)."""
    try:
        value = jsontext.loads(text)
    except jsontext.JsonError:
        return None
    return value if isinstance(value, dict) else None


class FleetKV:
    """JSON values at ``<prefix><path>``."""

    def __init__(self, store):
        self.store = store
        self.cluster = store.cluster
        self.prefix = store.prefix

    def put(self, path, value, lease=None):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        blocking(self.cluster.put, self.prefix + path, text, lease)

    def items(self, path):
        """``{path: value}`` of every JSON object under ``path`` (keys relative to the prefix)."""
        body = blocking(self.cluster.range_prefix, self.prefix + path)
        out = {}
        for kv in body.get("kvs") or ():
            value = _json(unb64(kv.get("value")).decode("utf-8", "replace"))
            if value is not None:
                out[unb64(kv["key"]).decode()[len(self.prefix):]] = value
        return out

    def delete(self, path):
        blocking(self.cluster.delete, self.prefix + path)

    def grant(self, ttl):
        return blocking(self.cluster.grant, ttl)

    def keepalive(self, lease):
        return blocking(self.cluster.keepalive, lease)

    def revoke(self, lease):
        blocking(self.cluster.revoke, lease)

    def etcd_version(self):
        """As APISIX reports it: the cluster version, else the server's."""
        body = blocking(self.cluster.version)
        return body.get("etcdcluster") or body.get("etcdserver") or "unknown"

    def new_id(self):
        return self.store.new_id()

    def watch(self, path, callback):
        """``callback(path, value dict or None, revision)`` for changes under ``path``."""
        self.store.watch_keys(path, lambda key, text, rev: callback(
            key, None if text is None else _json(text), rev))
