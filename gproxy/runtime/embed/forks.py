"""What a forked child of the host does with the embedded proxies it inherited.

``fork()`` copies every descriptor, but none of the threads: in the child
the proxy's hub thread (thread mode) or the channel's reader thread (process
mode) does not exist, while the child holds copies of the proxy's sockets.
Left alone, those copies would keep a stopped proxy's port open for as long
as the child lives, hold back the FIN of every session the proxy closes, and
let the child write into the process mode's channel.  So right after a fork,
in the child (``os.register_at_fork``), every live handle lets go of them:
``EmbeddedProxy._forked``.  The parent and the proxy notice nothing.

``hub_sockets(loop_fd)`` lists the sockets a gevent hub waits on: the targets
of its epoll descriptor, read from ``/proc/self/fdinfo`` (each with its inode,
so a number the host reused since is left alone).  ``blank(fd)`` points a
descriptor number at ``/dev/null``: the socket's last reference in this
process goes, but the number stays taken, so an object that still holds it
can never close someone else's descriptor.
"""

import os
import stat
import weakref

_handles = weakref.WeakSet()
_hooked = []


def adopt(handle):
    """Call ``handle._forked()`` in every child forked from now on (until it is collected)."""
    if not _hooked:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked.append(True)
    _handles.add(handle)


def _after_fork_in_child():
    handles = list(_handles)
    _handles.clear()  # the child's own forks have nothing left to release
    for handle in handles:
        try:
            handle._forked()
        except Exception:  # never fail a fork over this; the handle refuses calls anyway
            pass


def hub_sockets(loop_fd):
    """``[(fd, inode)]`` of the sockets registered with the epoll descriptor ``loop_fd``."""
    try:
        with open("/proc/self/fdinfo/%d" % loop_fd) as fh:
            lines = fh.read().splitlines()
    except (OSError, TypeError):
        return []
    found = []
    for line in lines:
        fields = line.split()
        if fields[:1] == ["tfd:"] and "ino:" in fields:
            found.append((int(fields[1]), int(fields[fields.index("ino:") + 1], 16)))
    return found


def blank(fd, inode=None):
    """Replace descriptor ``fd`` by ``/dev/null`` if it is a socket (with ``inode``)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or (inode is not None and st.st_ino != inode):
        return False
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)
    return True
