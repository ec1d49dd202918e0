"""``mode="thread"``: gproxy on its own gevent hub in a background thread of the host.

``ThreadProxy`` builds a ``Gproxy`` on a ``HubThread`` and returns once every
listener is bound, or raises what went wrong (a bad config, a port in use,
an unreachable store) after tearing the thread down.  Every Admin API call
runs on the hub thread through the Admin API's own Flask app (``local``);
``stop(grace)`` drains as SIGTERM does and leaves no thread and no
descriptor behind.  The proxy shares the host's GIL: a host whose threads
compute slows every relayed packet (docs/embedding.md has the figures).

In a child forked by the host the hub thread does not exist: the child lets
go of every socket the hub waits on (listeners, both ends of every session,
the Admin API's), so the parent's proxy keeps its ports and its sessions'
ends to itself.  Patches nothing, installs no signal handler.
"""

import os

from gproxy.errors import ProxyStopped
from gproxy.runtime.embed import forks
from gproxy.runtime.embed.handle import EmbeddedProxy
from gproxy.runtime.embed.local import local_admin, request
from gproxy.runtime.hubthread import HubThread


class ThreadProxy(EmbeddedProxy):
    """gproxy in a thread named ``gproxy-hub`` of this process."""

    mode = "thread"

    def __init__(self, cfg, take_over=None, timeout=60.0):
        super().__init__(cfg)
        self._take_over = (take_over, timeout)
        self._hub = HubThread("gproxy-hub")
        self._app = None
        self._client = None
        self._listener_fds = ()

    def _launch(self):
        self._hub.start(self._setup)

    def _setup(self):
        """On the hub: build, bind, serve (Gproxy.start undoes itself on failure)."""
        from gproxy.runtime.app import Gproxy
        path, timeout = self._take_over
        app = Gproxy(self.cfg, standby=path is not None)
        try:
            if path is None:
                app.start()
            else:
                from gproxy.runtime.transfer import take_over_at
                take_over_at(app, path, timeout)
        except BaseException:
            app.store.close()
            raise
        self._app = app
        self._client = local_admin(app, self.cfg)
        self.addresses = list(app.addresses)
        self._listener_fds = [(fd, os.fstat(fd).st_ino)
                              for fd in (listener.sock.fileno() for listener in app.listeners)]
        if app.admin_server is not None:
            self.admin_address = (app.admin_server.server_host, app.admin_server.server_port)

    def _request(self, method, path, data, query):
        return self._hub.call(request, self._client, method, path, data, query)

    def _reopen_logs(self):
        self._hub.call(self._app.reopen_logs)

    def _hand_over(self, path):
        from gproxy.runtime.transfer import give_all
        return self._hub.call(give_all, self._app, path)

    def _shutdown(self, grace):
        try:
            self._hub.call(self._drain, grace)
        finally:
            self._hub.finish()

    def _drain(self, grace):
        try:
            self._app.stop(grace)
        finally:
            self._app.store.close()

    def _release_in_child(self):
        for fd, inode in forks.hub_sockets(self._hub.loop_fileno()) + self._listener_fds:
            forks.blank(fd, inode)
        self._hub = _Gone(self._owner)


class _Gone:
    """A forked child's stand-in for the hub thread it did not inherit."""

    def __init__(self, owner):
        self._owner = owner

    def call(self, *args, **kwargs):
        raise ProxyStopped("this gproxy runs in a thread of process %d; a forked child cannot "
                           "use its handle" % self._owner)
