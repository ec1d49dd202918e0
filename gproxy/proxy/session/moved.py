"""A relaying session handed to another process: out of this one, into that one.

``stage(session)`` sends a session's two descriptors ahead while it still
relays here (pre-copy, as a live VM migration does), so that the pause
carries only the state.  ``export(session)`` quiesces it and adds what the
session room owns to the relay's state (``relay.handoff``): the session
record (``SessionInfo``, byte counts included: its route id, the one the
refine phase chose), the listener it was accepted on (by its address text),
the ``limit-conn`` slots it holds, the node a ``least_conn`` upstream counts
it on (``loadaware.Counted``), and what its access log line needs.

In the new process ``adopt(proxy, listeners, gate, state, socks)`` builds
the session again, and ``go`` runs it once the handover is committed: its
record goes live in the registry without counting as a new session, its
slots, its least_conn count and its place in the accept gate are taken
again (and given back when it ends here), and its relay resumes (``drop``
forgets it if the handover fails).  Back in the old one,
``let_go(session)`` forgets a session the other process runs now: slots and
gate place given back, record out of the registry, no goodbye on the wire
and no "session closed" line; ``restart`` runs it here again.

A session that is not relaying (still in its phases), or whose relay cannot
move (TLS, ending), is not exported: ``export`` returns None and the caller
ends it as SIGTERM would.  Nothing here does I/O beyond the relay's handoff.
"""

import logging
from dataclasses import fields

from gproxy.model.loadaware import Counted
from gproxy.proxy.relay import handoff
from gproxy.proxy.session.limits import Slot
from gproxy.proxy.session.session import Session
from gproxy.proxy.sessions.registry import SessionInfo

log = logging.getLogger("gproxy.session")

_FIELDS = tuple(f.name for f in fields(SessionInfo))


def stage(session):
    """Pre-copy, while the session still relays here: ``({"id"}, fds)``, or None.

    The descriptors go ahead so that the freeze (``export``) carries only the
    state; the other process builds what it can meanwhile (``runtime.handover``)."""
    relay = session.relay
    if relay is None or session.info.state != "relaying" or not handoff.movable(relay):
        return None
    return {"id": session.info.id}, handoff.descriptors(relay)


def export(session, staged=False):
    """Quiesce a relaying session; ``(state, fds)``, or None if it cannot move
    (no fds when they went ahead with ``stage``)."""
    relay = session.relay
    if relay is None or session.info.state != "relaying":
        return None
    state = handoff.export(relay)
    if state is None:
        return None
    info = session.info
    record = {name: getattr(info, name) for name in _FIELDS}
    record["hash_key"] = handoff.pack(info.hash_key)
    held = session.cleanup
    item = {"info": record, "relay": state, "listener": session.listener.text,
            "limits": [list(slot.key) for slot in held if isinstance(slot, Slot)],
            "counted": [[c.state.key, c.addr] for c in held
                        if isinstance(c, Counted) and c.state.key is not None],
            "tried": list(session.tried), "sni": session.sni}  # (its access log line)
    if staged:
        item["staged"] = True
        return item, ()
    return item, handoff.descriptors(relay)


def restart(session):
    """The handover failed: this process runs the session again."""
    handoff.restart(session.relay)


def let_go(session):
    """The other process runs the session now: forget it here without a word
    (its slots and gate place given back, and no access log line: it did not end)."""
    handoff.release(session.relay)
    session.registry.remove(session.info, moved=True)
    cleanup, session.cleanup = session.cleanup, None  # ended() now does nothing
    for release in cleanup or ():
        release()


def adopt(proxy, listeners, gate, state, socks):
    """The session of a received ``state`` on its two kernel sockets
    (``handoff.sockets``), built but not running yet (``go`` runs it, ``drop``
    forgets it if the handover is called off).  On an error the caller still
    owns ``socks``."""
    record = dict(state["info"])
    record["hash_key"] = handoff.unpack(record["hash_key"])
    info = SessionInfo(**{name: record[name] for name in _FIELDS if name in record})
    client, upstream = handoff.endpoints(socks, state["relay"], proxy.relays.loop)
    listener = listeners.get(state["listener"]) or _Elsewhere(state["listener"], gate)
    session = Session(proxy, listener, client, info)
    session.action = "proxying connection"
    session.tried, session.sni = list(state.get("tried", ())), state.get("sni")
    session.relay = handoff.resume(proxy.relays, client, upstream, info, session._relay_done,
                                   state["relay"])
    # what it holds, taken by go()
    session.cleanup = ([tuple(key) for key in state["limits"]],
                       [tuple(c) for c in state.get("counted", ())])
    return session


def go(session, balancing=None):
    """Run an adopted session: live in the registry, its slots and least_conn
    count taken (``balancing``: the process's ``loadaware.Shared``), its relay moving."""
    proxy = session.proxy
    (keys, counted), session.cleanup = session.cleanup, [session.listener.gate.leave]
    session.listener.gate.enter()
    for key in keys:
        proxy.limits.acquire(key)
        session.cleanup.append(Slot(proxy.limits, key))
    for key, addr in counted if balancing is not None else ():
        session.cleanup.append(balancing.count(key, addr))
    proxy.registry.adopt(session.info, session)
    session.tracked = True
    session.relay.start()


def drop(session):
    """Forget an adopted session that will not run here (no FIN: the giver keeps it)."""
    session.cleanup = []
    handoff.release(session.relay)


class _Elsewhere:
    """The listener of a handed session that this process does not listen on
    (removed from the config meanwhile): its text for log lines, the gate."""

    pipeline = ()

    def __init__(self, text, gate):
        self.text = text
        self.gate = gate
