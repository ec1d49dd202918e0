"""FileStore: the embedded durable store, one YAML file in APISIX standalone layout.

Every change rewrites the file atomically (temp file, fsync, rename, directory
fsync) so a crash or kill -9 leaves either the old or the new file, never a
torn one, and a write is acknowledged only once it is on disk.  The blocking
part (rendering, writing, fsync; reading and parsing on a reload) runs in
gevent's threadpool, so a slow disk stalls the one Admin request that waits
for it and never the hub that relays every session.  Writes are serialised
by a lock, so concurrent Admin requests cannot lose each other's changes.
Hand edits are noticed by ``poll()``; an edit that fails to parse or check is
logged and ignored, and the running data stays as it was.
"""

import logging
import os
import tempfile

from gevent.lock import RLock

from gproxy.errors import SchemaError
from gproxy.protocols.text import printable
from gproxy.store import codec
from gproxy.store.base import KINDS, Record, Store
from gproxy.store.threads import in_threadpool

log = logging.getLogger("gproxy.store")


class FileStore(Store):
    """The embedded durable store: one YAML file, atomically replaced on each write."""

    def __init__(self, path):
        super().__init__()
        self.path = os.path.abspath(path)
        self._revision = 0
        self._signature = None
        self._lock = RLock()  # one writer (or reload) at a time
        self._remove_stale_temp_files()
        if os.path.exists(self.path):
            self._apply(*self._read(strict=False))
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

    def _read(self, strict):
        """Blocking: the file's signature, data, errors and revision."""
        signature = self._stat()
        with open(self.path, encoding="utf-8") as fh:
            text = fh.read()
        if not strict and text.strip() and not codec.has_end_flag(text):
            log.warning("store: %s has no #END line; loading it anyway", self.path)
        data, errors, revision = codec.parse(text, self.path, require_end=strict)
        if errors and strict:
            raise SchemaError("; ".join(errors))
        return signature, data, errors, revision

    def _apply(self, signature, data, errors, revision):
        for err in errors:
            log.error("%s", printable(err))  # values from the file, one line each
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
        with self._lock:
            signature = in_threadpool(self._stat)
            if signature is None or signature == self._signature:
                return False
            try:
                loaded = in_threadpool(self._read, True)
            except (OSError, SchemaError) as exc:
                self._signature = signature  # report a broken edit once, not every poll
                log.error("store: ignoring edit of %s: %s", self.path, printable(str(exc)))
                return False
            self._apply(*loaded)
        log.warning("store: reloaded %s after an outside edit", self.path)
        self._notify()
        return True

    # -- the interface -----------------------------------------------------
    def put(self, kind, id_, value):
        with self._lock:
            self.poll()  # a hand edit saved since the last poll must not be overwritten
            id_ = str(id_)
            old = self._data[kind].get(id_)
            self._revision += 1
            record = Record(kind, id_, value, old.created_index if old else self._revision,
                            self._revision)
            data = {k: dict(v) for k, v in self._data.items()}
            data[kind][id_] = record
            self._commit(data)
        self._notify()
        return record, old is None

    def delete(self, kind, id_):
        with self._lock:
            self.poll()
            id_ = str(id_)
            old = self._data[kind].get(id_)
            if old is None:
                return None
            self._revision += 1
            data = {k: dict(v) for k, v in self._data.items()}
            del data[kind][id_]
            self._commit(data)
        self._notify()
        return old

    def new_id(self):
        while True:
            self._revision += 1
            new = "%020d" % self._revision
            if all(new not in records for records in self._data.values()):
                return new

    # -- writing -----------------------------------------------------------
    def _commit(self, data):
        """Write ``data`` durably, then make it current; on failure nothing changes."""
        values = {kind: [r.value for r in data[kind].values()] for kind in KINDS}
        self._signature = in_threadpool(self._write, values, self._revision)
        self._data = data

    def _mode(self):
        try:
            return os.stat(self.path).st_mode & 0o777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            return 0o666 & ~umask

    def _write(self, values, revision):
        """Blocking: render and replace the file durably; returns its new signature."""
        text = codec.render(values, revision)
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self._temp_prefix(), dir=directory)
        try:
            mode = self._mode()  # mkstemp makes 0600; keep the file's own mode,
            if values.get("ssls"):  # but private keys are for the owner only
                mode &= 0o700
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
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
        return self._stat()
