"""Replacing a file so that a crash leaves the old one or the new one, never a torn one.

``replace(path, data)`` writes a temp file beside ``path`` (``.<name>.*``),
fsyncs it, renames it over ``path`` and fsyncs the directory; the file keeps
its mode (owner-only when it holds private keys).  ``remove_stale(path)``
drops temp files a crash left behind.  Blocking: callers run it off the hub.
"""

import logging
import os
import tempfile

log = logging.getLogger("gproxy.store")


def fsync_dir(path):
    """Make the directory entries of ``path``'s directory durable."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(path):
    return ".%s." % os.path.basename(path)


def remove_stale(path):
    """Temp files left by a write a crash interrupted: never the file, safe to drop."""
    directory = os.path.dirname(path)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(_temp_prefix(path)):
            try:
                os.unlink(os.path.join(directory, name))
                log.info("store: removed %s left by an interrupted write", name)
            except OSError:
                pass


def _mode(path):
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def replace(path, data, private=False):
    """Replace ``path`` with ``data`` (bytes) durably; ``private``: owner-only."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=directory)
    try:
        mode = _mode(path)  # mkstemp makes 0600; keep the file's own mode,
        if private:  # but private keys are for the owner only
            mode &= 0o700
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path)
