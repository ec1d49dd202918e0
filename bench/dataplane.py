"""In-process data paths with real relaying sessions, for measuring and testing handovers.

``data_path()`` is what ``runtime.handover`` needs of a process (a Proxy with
its registry and relays, an accept gate, listeners, health, the load-aware
balancers' shared state, the sessions view with its evictions; a store, as
the base class, that keeps nothing) without listeners; ``relaying(app, name)`` adds one session relaying
between two socket pairs, registered as the session room registers its own,
and returns ``(client socket, broker socket, session)``: the session is its
``RelayedSession``, as once a real one relays.  Used by
scripts/handoff_cost.py and tests/integration/test_handover_inprocess.py.
"""

import socket
import types

from gproxy.model.loadaware import Shared
from gproxy.proxy.accept.overload import Gate
from gproxy.proxy.health import HealthCheckers
from gproxy.proxy.session.relayed import RelayedSession
from gproxy.proxy.session.session import Proxy, Session
from gproxy.proxy.sessions.live import LiveSessions
from gproxy.store.base import Store


class Listener:
    text = "127.0.0.1:1883"
    pipeline = ()

    def __init__(self, gate):
        self.gate = gate


def data_path(store=None):
    proxy = Proxy()
    gate = Gate()
    live = LiveSessions(proxy.registry, lambda: proxy.table)
    app = types.SimpleNamespace(proxy=proxy, registry=proxy.registry, gate=gate,
                                listeners=[], health=HealthCheckers(), listener=Listener(gate),
                                balancing=Shared(), discovery=None, fleet=None,
                                store=store or Store(), live=lambda: live, standby=False)
    app.go_live = lambda: setattr(app, "standby", False)
    return app


def relaying(app, name):
    """A session relaying between a test-side client socket and broker socket."""
    client, client_end = socket.socketpair()
    upstream_end, broker = socket.socketpair()
    for s in (client_end, upstream_end):
        s.setblocking(False)
    info = app.registry.new_session(("127.0.0.1", 40000), ("127.0.0.1", 1883))
    info.client_id, info.protocol_level, info.route_id = name, 4, "1"
    session = Session(app.proxy, app.listener, client_end, info)
    app.gate.enter()  # (the listener's accept slot: the session gives it back when it ends)
    session.track()
    session.set_state("relaying")  # then the hand-off, as Session.hand_off does it
    relay = RelayedSession(session, client_end, upstream_end, 60.0, True)
    relay.cleanup = []  # (what it holds besides the accept slot: the caller may add some)
    app.registry.set_handle(info, relay)
    app.proxy.relays.run(relay)
    return client, broker, relay
