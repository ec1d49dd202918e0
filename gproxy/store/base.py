"""The store interface: what the Admin API and the runtime ask of any backend.

A backend keeps stream routes, upstreams and ssls as plain dicts under string ids,
with etcd-like ``createdIndex``/``modifiedIndex`` revisions, and calls its
subscribers after every change, whoever made it (an Admin write, a hand edit,
another instance through etcd), with what changed: a list of
``(kind, id, record)`` (``record`` None: deleted; ``(kind, None, None)``: the
kind's objects are in a new order, ``list(kind)`` has it), so a subscriber
updates what it built from the store instead of rebuilding it all.
Nothing here does I/O.
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
        """Call ``callback(changes)`` after every change, whoever made it."""
        self._callbacks.append(callback)

    def _notify(self, changes):
        for callback in self._callbacks:
            callback(changes)

    def poll(self):
        """Pick up changes made outside this process; True if something changed."""
        return False

    def close(self):
        """Release what the backend holds (watches, connections)."""

    def hand_over(self):
        """A live upgrade's commit, in the old process: write nothing from now on
        (what is shared, as etcd, needs nothing)."""

    def take_over(self):
        """A live upgrade's commit, in the new process: catch up on what the old
        one wrote since this one loaded, and write from now on."""

    def snapshot(self):
        """``{kind: [value, ...]}`` in load order, for building a route table
        (at start: it copies every value)."""
        return {kind: [copy.deepcopy(r.value) for r in self.list(kind)] for kind in KINDS}


def diff(kind, old, fresh, pause=None):
    """The changes that turn ``old`` into ``fresh`` (``{id: Record}`` of one kind).

    A record whose value did not change is no change (a subscriber keeps what
    it built from it); ``pause()`` is called now and then over many records.
    """
    changes = []
    for n, (key, record) in enumerate(fresh.items()):
        prev = old.get(key)
        if prev is None or (prev is not record and prev.value != record.value):
            changes.append((kind, key, record))
        if pause is not None and n % 256 == 255:
            pause()
    if pause is not None:
        pause()
    changes.extend((kind, key, None) for key in old if key not in fresh)
    kept = [key for key in old if key in fresh]
    if pause is not None:
        pause()
    if kept + [key for key in fresh if key not in old] != list(fresh):
        changes.append((kind, None, None))  # not the order "kept, then new ones last"
    return changes


def check_item(kind, value, pause=None):
    """The Admin API's checks, less referential ones: like APISIX standalone, a
    route naming a missing upstream loads and fails per connection instead."""
    if not isinstance(value, dict) or value.get("id") is None:
        raise SchemaError("missing id")
    if kind == "upstreams":
        check_upstream(value, pause)
    elif kind == "ssls":
        check_ssl(value, pause)
    else:
        check_stream_route(value, pause=pause)
