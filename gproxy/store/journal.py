"""The file store's journal: Admin changes appended to one file, fsynced in groups.

Each entry is one line, ``\\n<crc32 hex> <json>``, the JSON being
``{"r": revision, "k": kind, "i": id, "v": value}`` (``"v": null``: deleted).
Every entry starts with a newline, so a torn entry (a crash in the middle of
an append) ends up on a line of its own; its checksum fails and it is
skipped, and the entries after it still read.  An append that fails is cut
off again (the file is truncated back to where it was), so a failed write
leaves nothing behind.  Appending and fsyncing block: the caller runs them
off the hub.  Nothing here knows the YAML file; ``FileStore`` folds the
journal into it and then removes the journal.
"""

import json
import logging
import os
import zlib

from gproxy.store.atomic import fsync_dir

log = logging.getLogger("gproxy.store")


def encode(revision, kind, id_, value_text):
    """One entry's bytes; ``value_text`` is the value's JSON, or None for a delete."""
    body = '{"r":%d,"k":%s,"i":%s,"v":%s}' % (revision, json.dumps(kind), json.dumps(id_),
                                              "null" if value_text is None else value_text)
    data = body.encode("utf-8", "surrogatepass")
    return b"\n%08x %s" % (zlib.crc32(data), data)


def decode(line):
    """``(revision, kind, id, value)`` of one line, or None if it is torn or foreign."""
    crc, _, data = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(data):
            return None
        entry = json.loads(data.decode("utf-8", "surrogatepass"))
        return int(entry["r"]), entry["k"], entry["i"], entry["v"]
    except (ValueError, KeyError, TypeError):
        return None


def read(path):
    """Blocking: every entry of the journal at ``path``, in order (none if it is absent)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return []
    entries, torn = [], 0
    for line in raw.split(b"\n"):
        if not line:
            continue
        entry = decode(line)
        if entry is None:
            torn += 1
        else:
            entries.append(entry)
    if torn:
        log.warning("store: %s: skipped %d torn or unreadable journal line(s)", path, torn)
    return entries


class Journal:
    """The open journal file: ``append(data)`` is durable when it returns (blocking)."""

    def __init__(self, path, mode=0o600):
        self.path = path
        self.mode = mode
        self.fd = None
        self.size = 0
        self.entries = 0

    def append(self, data, count):
        if self.fd is None:
            created = not os.path.exists(self.path)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
            self.size = os.fstat(self.fd).st_size
            if created:
                fsync_dir(self.path)  # the file's name must survive a crash too
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fdatasync(self.fd)
        except BaseException:
            self._cut()
            raise
        self.size += len(data)
        self.entries += count

    def _cut(self):
        """Take a failed append back off the file (best effort: a torn line is skipped anyway)."""
        try:
            if self.size == 0:  # nothing else in it: no journal at all
                self.close()
                os.unlink(self.path)
                return
            os.ftruncate(self.fd, self.size)
            os.fdatasync(self.fd)
        except OSError:
            pass

    def remove(self):
        """Blocking: close and delete the journal (its entries are in the YAML file now)."""
        self.close()
        self.size = self.entries = 0
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsync_dir(self.path)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
