"""The store interface: what the Admin API and the runtime ask of any backend.

A backend keeps stream routes, upstreams and ssls as plain dicts under string ids,
with etcd-like ``createdIndex``/``modifiedIndex`` revisions, and calls its
subscribers after every change, whoever made it (an Admin write, a hand edit,
another instance through etcd).  Nothing here does I/O.
"""

import copy
from dataclasses import dataclass

from gproxy.errors import SchemaError
from gproxy.model.resources import check_stream_route, check_upstream
from gproxy.model.ssls import check_ssl
from gproxy.store.keyring import Keyring

KINDS = ("upstreams", "stream_routes", "ssls")  # load order: routes may refer to upstreams


@dataclass
class Record:
    """One stored object and its etcd-like indexes."""

    kind: str
    id: str
    value: dict
    created_index: int
    modified_index: int

    @property
    def key(self):
        return "/apisix/%s/%s" % (self.kind, self.id)


class Store:
    """What a backend provides. Ids are strings; values are plain dicts.

    Every backend serves reads from its in-memory copy, ``self._data``
    (``{kind: {id: Record}}``), and calls ``_notify()`` after every change it
    applies.  ``put``/``delete`` return only once the change is durable
    (acknowledged writes survive a crash) and may wait cooperatively (never
    holding the hub).
    """

    def __init__(self, keyring=None):
        self._data = {kind: {} for kind in KINDS}
        self._callbacks = []
        self.keyring = keyring if keyring is not None else Keyring(None)

    def list(self, kind):
        return list(self._data[kind].values())

    def get(self, kind, id_):
        return self._data[kind].get(str(id_))

    def put(self, kind, id_, value):
        """Create or replace; returns ``(record, created)``."""
        raise NotImplementedError

    def delete(self, kind, id_):
        """Remove; returns the removed record or None."""
        raise NotImplementedError

    def new_id(self):
        """A fresh id for POST: a revision zero-padded to 20 digits, like APISIX."""
        raise NotImplementedError

    def open(self, kind, value):
        """``value`` with private keys given encrypted (APISIX's keyring) decrypted, so
        the Admin API checks what will be served; SchemaError if one cannot be."""
        return self.keyring.open(kind, value)

    def subscribe(self, callback):
        """Call ``callback()`` after every change, whoever made it."""
        self._callbacks.append(callback)

    def _notify(self):
        for callback in self._callbacks:
            callback()

    def poll(self):
        """Pick up changes made outside this process; True if something changed."""
        return False

    def close(self):
        """Release what the backend holds (watches, connections)."""

    def snapshot(self):
        """``{kind: [value, ...]}`` in load order, for building a route table."""
        return {kind: [copy.deepcopy(r.value) for r in self.list(kind)] for kind in KINDS}


def check_item(kind, value):
    """The Admin API's checks, less referential ones: like APISIX standalone, a
    route naming a missing upstream loads and fails per connection instead."""
    if not isinstance(value, dict) or value.get("id") is None:
        raise SchemaError("missing id")
    if kind == "upstreams":
        check_upstream(value)
    elif kind == "ssls":
        check_ssl(value)
    else:
        check_stream_route(value)
