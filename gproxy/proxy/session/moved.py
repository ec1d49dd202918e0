"""A relaying session handed to another process: out of this one, into that one.

A relaying session is its ``RelayedSession`` (relayed.py: the relay itself,
the registry's handle; the ``Session`` that ran the phases is gone), so that
is what moves.  A handle still in its phases (a ``Session``) or whose relay
cannot move (TLS, ending) is not exported: the functions here return None
and the caller ends it as SIGTERM would.

``stage(handle)`` sends a session's two descriptors ahead while it still
relays here (pre-copy, as a live VM migration does), so that the pause
carries only the state.  ``export(handle)`` quiesces it and adds what the
session room owns to the relay's state (``relay.handoff``): the session
record (``SessionInfo``, byte counts included: its route id, the one the
refine phase chose), the listener it was accepted on (by its address text),
the ``limit-conn`` slots it holds, the node a ``least_conn`` upstream counts
it on (``loadaware.Counted``), and what its access log line needs.

In the new process ``adopt(proxy, listeners, gate, state, socks)`` builds
the ``RelayedSession`` again, and ``go`` runs it once the handover is
committed: its record goes live in the registry without counting as a new
session, its slots, its least_conn count and its place in the accept gate
are taken again (and given back when it ends here), and its relay resumes
(``drop`` forgets it if the handover fails).  Back in the old one,
``let_go(handle)`` forgets a session the other process runs now: slots and
gate place given back, record out of the registry, no goodbye on the wire,
no "session closed" or access log line, and no reference cycle left behind;
``restart`` runs it here again.  Nothing here does I/O beyond the relay's
handoff.
"""

from dataclasses import fields

from gproxy.model.loadaware import Counted
from gproxy.proxy.relay import handoff
from gproxy.proxy.session.limits import Slot
from gproxy.proxy.session.relayed import RelayedSession
from gproxy.proxy.sessions.registry import SessionInfo

_FIELDS = tuple(f.name for f in fields(SessionInfo))


def _relaying(handle):
    """``handle`` if it is a relaying session (not one in its phases), else None."""
    if isinstance(handle, RelayedSession) and handle.info.state == "relaying":
        return handle
    return None


def stage(handle):
    """Pre-copy, while the session still relays here: ``({"id"}, fds)``, or None.

    The descriptors go ahead so that the freeze (``export``) carries only the
    state; the other process builds what it can meanwhile (``runtime.handover``)."""
    relay = _relaying(handle)
    if relay is None or not handoff.movable(relay):
        return None
    return {"id": relay.info.id}, handoff.descriptors(relay)


def export(handle, staged=False):
    """Quiesce a relaying session; ``(state, fds)``, or None if it cannot move
    (no fds when they went ahead with ``stage``)."""
    relay = _relaying(handle)
    if relay is None:
        return None
    state = handoff.export(relay)
    if state is None:
        return None
    info = relay.info
    record = {name: getattr(info, name) for name in _FIELDS}
    record["hash_key"] = handoff.pack(info.hash_key)
    held = relay.cleanup or ()
    item = {"info": record, "relay": state, "listener": relay.listener.text,
            "limits": [list(slot.key) for slot in held if isinstance(slot, Slot)],
            "counted": [[c.state.key, c.addr] for c in held
                        if isinstance(c, Counted) and c.state.key is not None],
            "tried": list(relay.tried), "sni": info.sni}  # (its access log line)
    if staged:
        item["staged"] = True
        return item, ()
    return item, handoff.descriptors(relay)


def restart(relay):
    """The handover failed: this process runs the session again."""
    handoff.restart(relay)


def let_go(relay):
    """The other process runs the session now: forget it here without a word."""
    handoff.release(relay)  # (the relay lets go of its watchers: no cycle is left)
    relay.proxy.registry.remove(relay.info, moved=True)
    relay.listener.gate.leave()
    cleanup, relay.cleanup = relay.cleanup, None
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
    if info.sni is None:
        info.sni = state.get("sni")
    held = state["relay"]
    client, upstream = handoff.endpoints(socks, held, proxy.relays.loop)
    listener = listeners.get(state["listener"]) or _Elsewhere(state["listener"], gate)
    tried = tuple(state.get("tried", ()))
    relay = RelayedSession.adopted(proxy, listener, client, upstream, info, held["idle"],
                                   held["mqtt"], tried if len(tried) > 1 else None)
    handoff.load(relay, held)
    # what it holds, taken by go() (until then its cleanup names them)
    relay.cleanup = ([tuple(key) for key in state["limits"]],
                     [tuple(c) for c in state.get("counted", ())])
    return relay


def go(relay, balancing=None):
    """Run an adopted session: live in the registry, its slots and least_conn
    count taken (``balancing``: the process's ``loadaware.Shared``), its relay
    moving (and the idle sweeper with it)."""
    proxy = relay.proxy
    (keys, counted), cleanup = relay.cleanup, []
    relay.listener.gate.enter()
    for key in keys:
        proxy.limits.acquire(key)
        cleanup.append(Slot(proxy.limits, key))
    for key, addr in counted if balancing is not None else ():
        cleanup.append(balancing.count(key, addr))
    relay.cleanup = cleanup or None
    proxy.registry.adopt(relay.info, relay)
    proxy.relays.run(relay)


def drop(relay):
    """Forget an adopted session that will not run here (no FIN: the giver keeps it)."""
    relay.cleanup = None
    handoff.release(relay)


class _Elsewhere:
    """The listener of a handed session that this process does not listen on
    (removed from the config meanwhile): its text for log lines, the gate."""

    pipeline = ()

    def __init__(self, text, gate):
        self.text = text
        self.gate = gate
