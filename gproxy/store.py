"""The store: where stream routes and upstreams are kept.

``Store`` is the small interface the Admin API and the server use; a second
backend (etcd with APISIX's key layout) can implement it.  ``FileStore`` is the
embedded default: one human-readable YAML file in APISIX standalone layout
(``stream_routes: [...]``, ``upstreams: [...]``, ``#END``), rewritten
atomically on every change (temp file, fsync, rename, directory fsync) so a
crash or kill -9 leaves either the old or the new file, never a torn one.
Hand edits are noticed by ``poll()``; an edit that fails to parse or check is
logged and ignored, and the running data stays as it was.
"""

import copy
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import yaml

from gproxy.errors import SchemaError
from gproxy.resources import check_stream_route, check_upstream

log = logging.getLogger("gproxy.store")

KINDS = ("upstreams", "stream_routes")  # load order: routes may refer to upstreams
END_FLAG = "#END"
HEADER = ("# gproxy store: stream routes and upstreams, APISIX standalone layout.\n"
          "# Written by the Admin API; hand edits are picked up within a second or two\n"
          "# (keep the #END line last); an edit that fails to load is logged and ignored.\n")


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
    """What a backend provides. Ids are strings; values are plain dicts."""

    def list(self, kind):
        raise NotImplementedError

    def get(self, kind, id_):
        raise NotImplementedError

    def put(self, kind, id_, value):
        """Create or replace; returns ``(record, created)``."""
        raise NotImplementedError

    def delete(self, kind, id_):
        """Remove; returns the removed record or None."""
        raise NotImplementedError

    def new_id(self):
        """A fresh id for POST: a revision zero-padded to 20 digits, like APISIX."""
        raise NotImplementedError

    def subscribe(self, callback):
        """Call ``callback()`` after every change, whoever made it."""
        raise NotImplementedError

    def poll(self):
        """Pick up changes made outside this process; True if something changed."""
        return False

    def snapshot(self):
        """``{kind: [value, ...]}`` in load order, for building a route table."""
        return {kind: [copy.deepcopy(r.value) for r in self.list(kind)] for kind in KINDS}


def check_item(kind, value):
    """The Admin API's checks, less referential ones: like APISIX standalone, a
    route naming a missing upstream loads and fails per connection instead."""
    if kind == "upstreams":
        check_upstream(value)
    else:
        check_stream_route(value)


def parse(text, path, require_end=True):
    """Parse and check a store file's text; returns ``{kind: [value, ...]}`` and errors."""
    if require_end and text.rstrip()[-len(END_FLAG):] != END_FLAG:
        raise SchemaError("missing valid end flag in file %s" % path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SchemaError("%s is not valid YAML: %s" % (path, exc)) from None
    if not isinstance(data, dict):
        raise SchemaError("%s: expected a mapping with stream_routes and upstreams" % path)
    out, errors = {}, []
    for kind in KINDS:
        items = data.get(kind) or []
        if not isinstance(items, list):
            raise SchemaError("%s: %s must be a list" % (path, kind))
        out[kind] = []
        for value in items:
            try:
                if not isinstance(value, dict) or value.get("id") is None:
                    raise SchemaError("missing id")
                check_item(kind, value)
            except SchemaError as exc:
                errors.append("failed to check item data of [%s] err:%s ,val: %s"
                              % (kind, exc, json.dumps(value, default=str)))
                continue
            out[kind].append(value)  # the id keeps its type; the store key is str(id)
    return out, errors, int(data.get("gproxy_revision") or 0)


class FileStore(Store):
    """The embedded durable store: one YAML file, atomically replaced on each write."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self._data = {kind: {} for kind in KINDS}
        self._revision = 0
        self._callbacks = []
        self._signature = None
        self._remove_stale_temp_files()
        if os.path.exists(self.path):
            self._load(strict=False)
        else:
            log.info("store: %s does not exist yet; starting empty", self.path)

    def _temp_prefix(self):
        return ".%s." % os.path.basename(self.path)

    def _remove_stale_temp_files(self):
        """Temp files left by a write a crash interrupted: never the store, safe to drop."""
        directory = os.path.dirname(self.path)
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(self._temp_prefix()):
                try:
                    os.unlink(os.path.join(directory, name))
                    log.info("store: removed %s left by an interrupted write", name)
                except OSError:
                    pass

    # -- reading -----------------------------------------------------------
    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self, strict):
        signature = self._stat()
        with open(self.path, encoding="utf-8") as fh:
            text = fh.read()
        if not strict and text.strip() and END_FLAG not in text[-16:]:
            log.warning("store: %s has no #END line; loading it anyway", self.path)
        data, errors, revision = parse(text, self.path, require_end=strict)
        if errors and strict:
            raise SchemaError("; ".join(errors))
        for err in errors:
            log.error("%s", err)
        self._signature = signature
        self._revision = max(self._revision, revision)
        fresh = {kind: {} for kind in KINDS}
        for kind in KINDS:
            for value in data[kind]:
                key = str(value["id"])
                old = self._data[kind].get(key)
                self._revision += 1
                created = old.created_index if old else self._revision
                fresh[kind][key] = Record(kind, key, value, created, self._revision)
                if key.isdigit():  # POST ids are revisions: never hand one out twice
                    self._revision = max(self._revision, int(key))
        self._data = fresh

    def poll(self):
        signature = self._stat()
        if signature is None or signature == self._signature:
            return False
        try:
            self._load(strict=True)
        except (OSError, SchemaError) as exc:
            self._signature = signature  # report a broken edit once, not every poll
            log.error("store: ignoring edit of %s: %s", self.path, exc)
            return False
        log.warning("store: reloaded %s after an outside edit", self.path)
        self._notify()
        return True

    # -- the interface -----------------------------------------------------
    def list(self, kind):
        return list(self._data[kind].values())

    def get(self, kind, id_):
        return self._data[kind].get(str(id_))

    def put(self, kind, id_, value):
        self.poll()  # a hand edit saved since the last poll must not be overwritten
        id_ = str(id_)
        old = self._data[kind].get(id_)
        self._revision += 1
        record = Record(kind, id_, value, old.created_index if old else self._revision,
                        self._revision)
        data = {k: dict(v) for k, v in self._data.items()}
        data[kind][id_] = record
        self._commit(data)
        return record, old is None

    def delete(self, kind, id_):
        self.poll()
        id_ = str(id_)
        old = self._data[kind].get(id_)
        if old is None:
            return None
        self._revision += 1
        data = {k: dict(v) for k, v in self._data.items()}
        del data[kind][id_]
        self._commit(data)
        return old

    def new_id(self):
        while True:
            self._revision += 1
            new = "%020d" % self._revision
            if all(new not in records for records in self._data.values()):
                return new

    def subscribe(self, callback):
        self._callbacks.append(callback)

    # -- writing -----------------------------------------------------------
    def _commit(self, data):
        """Write ``data`` durably, then make it current; on failure nothing changes."""
        self._write(data)
        self._data = data
        self._notify()

    def _notify(self):
        for callback in self._callbacks:
            callback()

    def render(self, data):
        doc = {kind: [r.value for r in data[kind].values()]
               for kind in ("stream_routes", "upstreams")}
        doc["gproxy_revision"] = self._revision
        body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
        return HEADER + body + END_FLAG + "\n"

    def _mode(self):
        try:
            return os.stat(self.path).st_mode & 0o777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            return 0o666 & ~umask

    def _write(self, data):
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self._temp_prefix(), dir=directory)
        try:
            os.fchmod(fd, self._mode())  # mkstemp makes 0600; keep the file's own mode
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.render(data))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._signature = self._stat()
