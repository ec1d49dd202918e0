"""FileStore: the embedded durable store, APISIX standalone YAML plus a journal.

An Admin write is appended to ``<file>.journal`` (``journal``) and fsynced
before it is acknowledged.  Writes that arrive while an append is being
fsynced go into the next append together (group commit): concurrent writers
share one fsync, and a write costs the same with 10 routes as with 10,000.
The journal is folded into the YAML file (rewritten atomically: temp file,
fsync, rename, directory fsync; then the journal is removed) once writes
pause for ``FOLD_IDLE`` seconds, or as soon as it holds half as many
entries as the store has objects (at least ``FOLD_MIN``), so on average a
write pays a constant share of a fold, however big the store.  A crash or kill -9 at any moment leaves the YAML file whole and the
journal readable up to its last complete entry: the next start replays it,
and every acknowledged write is there.  Blocking work (appends, fsync,
folds, reading the file) runs in gevent's threadpool, and work over many
items (rendering, parsing, checking) pauses between items, so none of it
holds the hub.  Subscribers hear each group of changes once
(``Store.subscribe``), before its writers are answered.

Hand edits of the YAML file are noticed by ``poll()`` and before each group
of writes: an edit that parses and checks replaces the data (Admin changes
still in the journal, which the editor could not see, are dropped with a
warning); one that does not is logged and ignored.

A live upgrade passes the files from one process to the next, one writer at
a time: the new process opens them ``standby`` (it reads the file and the
journal, and touches neither); at the commit the old one ``hand_over()``s
(refuses writes from then on, answers what is queued, folds its journal)
and the new one ``take_over()``s (reads what the old one wrote since, and
writes from then on).
"""

import logging
import os

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import RLock

from gproxy import hub
from gproxy.errors import SchemaError, StoreUnavailable
from gproxy.protocols.text import printable
from gproxy.store import atomic, codec, journal
from gproxy.store.base import KINDS, Record, Store, check_item, diff
from gproxy.store.threads import in_threadpool

log = logging.getLogger("gproxy.store")
FOLD_IDLE = 1.0  # seconds without writes before the journal is folded into the file
FOLD_MIN = 1024  # journal entries that always justify a fold


def _yaml_layout(data, path):
    return codec.yaml_layout(data.decode("utf-8"), path)


class _Write:
    """One queued put (``value``) or delete (``value`` None) and its answer."""

    __slots__ = ("kind", "id", "value", "result")

    def __init__(self, kind, id_, value):
        self.kind, self.id, self.value = kind, id_, value
        self.result = AsyncResult()


class FileStore(Store):
    """The embedded durable store: one YAML file and its journal."""

    def __init__(self, path, pause=hub.pause, keyring=None, standby=False):
        super().__init__(keyring)
        self.path = os.path.abspath(path)
        self.journal = journal.Journal(self.path + ".journal")
        self._pause = pause
        self._revision = 0
        self._signature = None
        self._texts = {kind: {} for kind in KINDS}  # id -> the item's line in the file
        self._lock = RLock()  # a group commit, a reload or a fold: one at a time
        self._queue = []
        self._wake = Event()
        self._committer = None
        self._closing = False
        self._file_revision = 0  # the revision the file was written at
        self._writer = None if standby else True  # False once handed to a new process
        if not standby:
            atomic.remove_stale(self.path)
        self._start()

    # -- starting: the file, then what the journal adds ---------------------
    def _start(self):
        """Blocking (nothing is served yet): load, replay, fold."""
        values, revision = {kind: [] for kind in KINDS}, 0
        if os.path.exists(self.path):
            self._signature, text = self._stat(), self._read_text()
            if text.strip() and not codec.has_end_flag(text):
                log.warning("store: %s has no #END line; loading it anyway", self.path)
            values, errors, revision = codec.parse(text, self.path, require_end=False,
                                                   keyring=self.keyring)
            for err in errors:
                log.error("%s", printable(err))  # values from the file, one line each
        else:
            log.info("store: %s does not exist yet; starting empty", self.path)
        self._load(values, revision, pause=None)
        self._file_revision = revision
        entries = journal.read(self.journal.path)
        replayed = sum(self._replay(entry, revision) for entry in entries)
        if os.path.exists(self.journal.path) and self._writer:
            log.warning("store: replayed %d change(s) from %s", replayed, self.journal.path)
            self._signature = self._write_file(self._render(None))
            self.journal.remove()

    def _replay(self, entry, base):
        revision, kind, id_, value = entry
        if revision <= base or kind not in KINDS:
            return 0  # already in the file (folded before the journal was removed)
        if value is not None:
            try:
                check_item(kind, value)
            except SchemaError as exc:
                log.error("store: journal entry %s/%s skipped: %s", kind, printable(id_),
                          printable(str(exc)))
                return 0
        self._revision = max(self._revision, revision)  # ids handed out stay used
        self._apply_one(kind, str(id_), value)
        return 1

    def _apply_one(self, kind, id_, value, text=None):
        """Set or (``value`` None) drop one record; returns the new record or None."""
        if value is None:
            self._data[kind].pop(id_, None)
            self._texts[kind].pop(id_, None)
            return None
        old = self._data[kind].get(id_)
        self._revision += 1
        record = Record(kind, id_, value, old.created_index if old else self._revision,
                        self._revision)
        self._data[kind][id_] = record
        self._texts[kind][id_] = text if text is not None else codec.item_text(value)
        return record

    def _load(self, values, revision, pause):
        """Make ``values`` (``{kind: [value, ...]}``) the data; returns the changes."""
        self._revision = max(self._revision, revision)
        changes = []
        for kind in KINDS:
            old, fresh, texts = self._data[kind], {}, {}
            for n, value in enumerate(values[kind]):
                key = str(value["id"])
                kept = old.get(key)
                if kept is not None and kept.value == value:
                    fresh[key], texts[key] = kept, self._texts[kind][key]
                else:
                    self._revision += 1
                    fresh[key] = Record(kind, key, value, kept.created_index if kept
                                        else self._revision, self._revision)
                    texts[key] = codec.item_text(value)
                if key.isdigit():  # POST ids are revisions: never hand one out twice
                    self._revision = max(self._revision, int(key))
                if pause is not None and n % codec.EVERY == 0:
                    pause()
            changes += diff(kind, old, fresh, pause)
            self._data[kind], self._texts[kind] = fresh, texts
        return changes

    # -- hand edits ------------------------------------------------------------
    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read_text(self):
        with open(self.path, encoding="utf-8") as fh:
            return fh.read()

    def _read_bytes(self):
        with open(self.path, "rb") as fh:
            return fh.read()

    def _reload_if_edited(self):
        """The changes of a hand edit saved since we last looked (None: there was none)."""
        signature = in_threadpool(self._stat)
        if signature is None or signature == self._signature:
            return None
        try:
            data = in_threadpool(self._read_bytes)  # decoded a line at a time, on the hub
            if not codec.has_end_flag(data):
                raise SchemaError("missing valid end flag in file %s" % self.path)
            items = codec.json_layout(data, self._pause) or in_threadpool(
                _yaml_layout, data, self.path)
            values, errors = codec.check_items(items[0], self._pause, self.keyring)
            if errors:
                raise SchemaError("; ".join(errors))
        except (OSError, SchemaError) as exc:
            self._signature = signature  # report a broken edit once, not every poll
            log.error("store: ignoring edit of %s: %s", self.path, printable(str(exc)))
            return None
        if self.journal.entries:
            log.warning("store: %s was edited by hand; %d Admin change(s) not yet in it "
                        "are dropped", self.path, self.journal.entries)
            in_threadpool(self.journal.remove)
        self._signature, self._file_revision = signature, items[1]
        changes = self._load(values, items[1], self._pause)
        log.warning("store: reloaded %s after an outside edit", self.path)
        return changes

    def poll(self):
        if not self._writer:
            return False  # standby: the data as at start until the commit
        with self._lock:
            changes = self._reload_if_edited()
            if changes:
                self._notify(changes)
        return changes is not None

    # -- the interface -----------------------------------------------------
    def put(self, kind, id_, value):
        return self._submit(_Write(kind, str(id_), value))

    def delete(self, kind, id_):
        return self._submit(_Write(kind, str(id_), None))

    def new_id(self):
        while True:
            self._revision += 1
            new = "%020d" % self._revision
            if all(new not in records for records in self._data.values()):
                return new

    def fold(self):
        """Answer what is queued, then fold the journal into the file now."""
        while self._committer is not None:
            self._closing = True  # the committer folds at once instead of waiting
            self._wake.set()
            self._committer.join()
        self._closing = False
        with self._lock:
            if self.journal.entries:
                self._fold()

    def close(self):
        """Fold what the journal holds into the file (on shutdown)."""
        if self._writer:
            self.fold()
        self.journal.close()

    # -- a live upgrade: the files pass to the new process -------------------
    def hand_over(self):
        """The old process, at the commit: no write from now on, the queued ones
        answered and the journal folded, so the file holds every one."""
        self._writer = False
        self.fold()

    def take_over(self):
        """The new process, at the commit: what the old one wrote since this one
        loaded (its journal too, if it could not fold it), told to the
        subscribers; this process writes from now on."""
        with self._lock:
            self._writer = True
            changes = self._reload_if_edited() or []
            left = in_threadpool(journal.read, self.journal.path)
            for entry in left:
                if self._replay(entry, self._file_revision):
                    kind, id_ = entry[1], str(entry[2])
                    changes.append((kind, id_, self._data[kind].get(id_)))
                    self._pause()
            if left:
                self._fold()
            if changes:
                self._notify(changes)

    # -- group commit ----------------------------------------------------------
    def _submit(self, write):
        if not self._writer:
            raise StoreUnavailable("a live upgrade is passing the store to a new process: "
                                   "try again")
        self._queue.append(write)
        if self._committer is None:
            self._committer = gevent.spawn(self._commit_loop)
        self._wake.set()
        return write.result.get()

    def _commit_loop(self):
        try:
            while True:
                while self._queue:
                    batch, self._queue = self._queue, []
                    with self._lock:
                        self._commit(batch)
                        if self.journal.entries >= max(FOLD_MIN, self._count() // 2):
                            self._fold()
                if not self.journal.entries:
                    return
                self._wake.clear()
                woken = False if self._closing else self._wake.wait(FOLD_IDLE)
                if woken or self._queue:
                    continue
                with self._lock:
                    self._fold()
                if not self._queue:
                    return
        finally:
            self._committer = None

    def _count(self):
        return sum(len(records) for records in self._data.values())

    def _stage(self, batch):
        """Each write's answer and journal entry, against the data as it will be."""
        staged, answers, lines = {}, [], []
        for write in batch:
            key = (write.kind, write.id)
            old = staged[key][0] if key in staged else self._data[write.kind].get(write.id)
            if write.value is None and old is None:
                answers.append(None)
                continue
            self._revision += 1
            text = None if write.value is None else codec.item_text(write.value)
            lines.append(journal.encode(self._revision, write.kind, write.id, text))
            if write.value is None:
                staged[key] = (None, None)
                answers.append(old)
            else:
                record = Record(write.kind, write.id, write.value,
                                old.created_index if old else self._revision, self._revision)
                staged[key] = (record, text)
                answers.append((record, old is None))
        return staged, answers, lines

    def _commit(self, batch):
        """Make ``batch`` durable, apply it, tell the subscribers, answer the writers."""
        try:
            changes = self._reload_if_edited() or []
            staged, answers, lines = self._stage(batch)
            if lines:
                in_threadpool(self.journal.append, b"".join(lines), len(lines))
        except Exception as exc:  # nothing of this batch was applied
            for write in batch:
                write.result.set_exception(exc)
            return
        for (kind, id_), (record, text) in staged.items():
            if record is None:
                self._apply_one(kind, id_, None)
            else:
                self._data[kind][id_] = record
                self._texts[kind][id_] = text
            changes.append((kind, id_, record))
        try:
            if changes:
                self._notify(changes)
        except Exception as exc:  # durable, but not in effect: the writers hear it
            log.exception("store: a subscriber failed to apply %d change(s)", len(changes))
            for write in batch:
                write.result.set_exception(exc)
            return
        for write, answer in zip(batch, answers):
            write.result.set(answer)

    # -- folding the journal into the file -------------------------------------
    def _render(self, pause):
        """The file's bytes, encoded a part at a time (a thread encoding 5 MB would
        hold the interpreter lock, and so the hub, for its whole length)."""
        texts = {kind: list(self._texts[kind].values()) for kind in KINDS}
        out = []
        for n, part in enumerate(codec.render_parts(texts, self._revision, pause)):
            out.append(part.encode("utf-8", "surrogatepass"))
            if pause is not None and n % (codec.EVERY * 64) == 0:
                pause()
        return b"".join(out)

    def _fold(self):
        """Rewrite the file with everything and drop the journal (kept if that fails)."""
        changes = self._reload_if_edited()
        if changes:  # a hand edit won: the journal is gone already
            self._notify(changes)
            return
        try:
            self._signature = in_threadpool(self._write_file, self._render(self._pause))
            in_threadpool(self.journal.remove)
        except OSError as exc:
            log.error("store: could not fold %s into %s (kept; retrying later): %s",
                      self.journal.path, self.path, exc)

    def _write_file(self, data):
        """Blocking: replace the file durably with ``data``; returns its new signature."""
        atomic.replace(self.path, data, private=bool(self._data["ssls"]))
        return self._stat()
