"""Embedding: ``gproxy.start(config)`` in a synchronous, never monkey-patched program.

``start`` runs gproxy beside the host program and returns an
``EmbeddedProxy`` handle once every listener is bound, or raises, in the
caller's thread, what went wrong (a bad config, a port in use, an
unreachable store), leaving nothing behind.  Two ways to run it:

* ``mode="process"`` (the default, ``inprocess``): a child process the handle
  owns, a fresh interpreter running what the ``gproxy`` command runs, tied to
  the host's life; the handle talks to it over a socketpair.  Relaying never
  waits for the host's GIL, so a host whose threads compute does not slow it.
* ``mode="thread"`` (``inthread``): a gevent hub in a background thread of
  the host: no second process, but every relayed packet waits for the GIL
  behind the host's own threads.

docs/embedding.md has the trade-off with figures.  ``handle`` is the API both
share; ``forks`` makes a ``fork()`` of the host safe for both.  Nothing here
patches anything or installs a signal handler in the host.
"""

from gproxy.errors import HandoverError, ProxyStopped
from gproxy.runtime.embed.handle import AdminError, EmbeddedProxy, load_config

__all__ = ["start", "AdminError", "EmbeddedProxy", "HandoverError", "ProxyStopped",
           "load_config", "MODES"]

MODES = ("process", "thread")


def start(config=None, mode="process", workers=1, python=None, take_over=None, timeout=60.0):
    """Start gproxy beside this program; returns once its listeners are bound.

    ``mode`` is ``"process"`` (a child process) or ``"thread"`` (a hub thread
    here); ``workers`` > 1 (process mode only) forks that many proxy processes
    from the child, as ``gproxy --workers``; ``python`` is the interpreter the
    child runs (default ``sys.executable``).  ``take_over``: a Unix socket
    path where this proxy waits (up to ``timeout`` seconds) for another
    embedded gproxy's ``hand_over(path)``, usually in the host program's
    previous process, and takes its listeners and live sessions instead of
    binding (docs/embedding.md).
    """
    if mode not in MODES:
        raise ValueError("mode=%r: gproxy.start runs in mode 'process' or 'thread'" % (mode,))
    if mode == "thread":
        return _start_thread(config, workers, take_over, timeout)
    if workers < 1:
        raise ValueError("workers=%r: at least 1" % (workers,))
    from gproxy.runtime.embed.inprocess import ProcessProxy
    return ProcessProxy(load_config(config), workers, python, take_over, timeout)._start()


def _start_thread(config, workers, take_over=None, timeout=60.0):
    from gproxy.hub import monkey_patched
    if workers != 1:
        raise ValueError("workers=%r: with mode='thread' embedded gproxy runs in this process "
                         "(forked workers would copy the host program); use mode='process' "
                         "for that" % (workers,))
    if monkey_patched():
        raise RuntimeError("gproxy.start(mode='thread') is for programs that are not "
                           "monkey-patched; in a gevent program use mode='process', or run "
                           "gproxy.runtime.app.Gproxy on your own hub")
    from gproxy.runtime.embed.inthread import ThreadProxy
    return ThreadProxy(load_config(config), take_over, timeout)._start()
