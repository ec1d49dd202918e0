"""One native thread that runs a gevent hub, and safe calls into it from any thread.

gevent hubs are per thread: the hub started here belongs to this thread alone,
and nothing in the calling program is patched or shares it.  Callers never
touch hub objects: ``call(func)`` hands ``func`` to the hub with
``loop.run_callback_threadsafe``, runs it in a fresh greenlet there (so it may
wait cooperatively) and waits on a ``concurrent.futures.Future`` for the
result or the exception.  ``finish()`` ends the hub's main greenlet, destroys
the hub (its loop's fds, resolver and threadpool) and waits for the thread and
the threadpool's native threads to be gone, so nothing is left behind.
"""

import concurrent.futures
import sys
import threading
import time

import gevent
import gevent.event

from gproxy.errors import ProxyStopped

THREADS_GONE_TIMEOUT = 5.0


class HubStopped(ProxyStopped):
    """The hub thread has finished; nothing more can run on it."""


class HubThread:
    """A background thread with its own gevent hub."""

    def __init__(self, name):
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._loop = None
        self._done = None  # gevent Event, set on the hub to end its main greenlet
        self._wake = None  # async watcher: finish() sends it from any thread
        self._setup = None
        self._started = concurrent.futures.Future()
        self._worker_idents = ()
        self._pending = set()  # futures of calls not yet answered
        self._lock = threading.Lock()

    def start(self, setup):
        """Run ``setup()`` on the hub; return its result or raise its exception.

        On an exception the hub is torn down and the thread has ended.
        """
        self._setup = setup
        self.thread.start()
        try:
            return self._started.result()
        except BaseException:
            self._join()
            raise

    def _main(self):
        hub = gevent.get_hub()
        self._loop = hub.loop
        self._done = gevent.event.Event()
        # An active async watcher keeps the loop running once gproxy has stopped
        # and closed every other watcher, until finish() sends it.
        self._wake = hub.loop.async_()
        self._wake.start(self._done.set)
        try:
            self._started.set_result(self._setup())
        except BaseException as exc:  # carried to the caller of start()
            self._started.set_exception(exc)
        else:
            self._done.wait()
        finally:
            self._wake.close()
            self._teardown(hub)

    def _teardown(self, hub):
        pool = hub._threadpool  # only if something used it; don't create one now
        if pool is not None:
            workers = list(getattr(pool, "_worker_greenlets", ()))
            self._worker_idents = [getattr(w, "_thread_ident", 0) for w in workers]
            pool.kill()
            deadline = time.monotonic() + THREADS_GONE_TIMEOUT
            while len(getattr(pool, "_worker_greenlets", ())) and time.monotonic() < deadline:
                gevent.sleep(0.01)
        with self._lock:
            self._loop = None
            pending, self._pending = self._pending, set()
        for future in pending:  # queued while stopping: never leave a caller waiting
            if not future.done():
                future.set_exception(HubStopped("gproxy has stopped"))
        hub.destroy(destroy_loop=True)

    def call(self, func, *args, timeout=None):
        """Run ``func(*args)`` in a greenlet on the hub; its result, or its exception."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("call() is for other threads; on the hub, call func directly")
        future = concurrent.futures.Future()

        def run():
            with self._lock:
                self._pending.discard(future)
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(func(*args))
            except BaseException as exc:  # carried to the calling thread
                future.set_exception(exc)

        with self._lock:
            if self._loop is None or not self.thread.is_alive():
                raise HubStopped("gproxy has stopped")
            self._pending.add(future)
            self._loop.run_callback_threadsafe(gevent.spawn, run)
        return future.result(timeout)

    def loop_fileno(self):
        """The descriptor the hub's loop waits on (its epoll), or None."""
        try:
            return self._loop.fileno() if self._loop is not None else None
        except Exception:  # a loop without a backend descriptor
            return None

    def finish(self):
        """End the hub and wait until its thread and threadpool threads are gone."""
        with self._lock:
            if self._loop is not None and self.thread.is_alive():
                self._wake.send()  # ev_async_send: safe from any thread
        self._join()

    def _join(self):
        self.thread.join()
        deadline = time.monotonic() + THREADS_GONE_TIMEOUT
        while time.monotonic() < deadline:
            alive = set(sys._current_frames())
            if not any(ident in alive for ident in self._worker_idents):
                return
            time.sleep(0.01)
