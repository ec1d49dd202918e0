"""One data path's listeners and live sessions, handed from an old process to a new one.

Both ends talk over a connected Unix stream socket (``wire.Wire``: JSON
messages with descriptors).  The giver is the old process (or worker), the
taker the new one:

    giver -> taker  {"op": "listeners", "stream": [addr...], "http": [addr...],
                     "early": {...}}  + fds
    taker -> giver  {"op": "ready"}            the taker accepts on them now
                    (the giver stops accepting: both did for a moment, none refused)
    giver -> taker  {"op": "stage", "items": [{"id"}...]}  + 2 fds a session, 120 a message:
                    pre-copy, while the sessions still relay in the giver
    giver -> taker  {"op": "staged"}; taker -> giver {"op": "staged"}   all of it taken
    giver -> taker  {"op": "sessions", "items": [state...]}  + 2 fds for each not staged:
                    each quiesced, then sent; rounds until none waits (up to SETTLE s)
    giver -> taker  {"op": "state", "totals": {...}, "health": {...}, "rates": [...],
                     "ewma": [...]}
    taker -> giver  {"op": "prepared", "refused": [session ids]}
    giver -> taker  {"op": "commit", "carries": bool}   the point of no return
    taker -> giver  {"op": "committed"}        the taker's relays run; the giver forgets them
    giver -> taker  {"op": "carried", ...}     when it carries: store, fleet, jobs (``carry``)

Until the commit every exported relay stays quiesced in the giver and the
adopted ones are not started in the taker, so if anything fails (the taker
exits or times out, a message is refused, ``abort``) the giver restarts
every session where it stood and accepts again, and the taker drops what it
adopted without a FIN.  A giver that is a whole gproxy (``top``: not one
worker of several) also carries what the process holds besides sessions
(``runtime.carry``).  A session pauses from its export until the commit:
its descriptors went ahead (``stage``), so the pause carries only the state
(docs/upgrade.md has the figures).  The format of a session's state is
``relay.handoff``'s ``FORMAT``; the process that receives another version
refuses the handover before any session moves (``runtime.upgrade``).
"""

import logging
import time

import gevent
import gevent.socket

from gproxy.proxy.relay import handoff
from gproxy.proxy.session import moved
from gproxy.runtime import carry
from gproxy.runtime.wire import HandoverError

__all__ = ("FORMAT", "Giver", "HandoverError", "Taker")

log = logging.getLogger("gproxy.upgrade")

FORMAT = handoff.FORMAT
BATCH = 120  # sessions a message: 240 descriptors, under the kernel's 253 (SCM_MAX_FD)
SETTLE = 2.0  # seconds to wait for sessions still in their phases to start relaying


def stream_listeners(app):
    return [lst for lst in app.listeners if lst.server is not None and not lst.server.closed]


class _Batches:
    """Items (and their descriptors) sent ``BATCH`` to a message, yielding between two."""

    def __init__(self, wire, op):
        self.wire, self.op = wire, op
        self.items, self.fds = [], []

    def add(self, item, fds):
        self.items.append(item)
        self.fds.extend(fds)
        if len(self.items) == BATCH:
            self.flush()
            gevent.sleep(0)  # the Admin API answers meanwhile

    def flush(self):
        if self.items:
            self.wire.send({"op": self.op, "items": self.items}, self.fds)
            self.items, self.fds = [], []


# -- the old side -------------------------------------------------------------------------
class Giver:
    """The old process's (or worker's) end: listeners, then sessions, then commit."""

    def __init__(self, app, wire, http=(), top=False):
        self.app = app
        self.wire = wire
        self.http = list(http)  # (addr text, socket) of the parent's HTTP listeners
        self.top = top  # the whole gproxy: it carries the store, fleet and jobs too
        self.held = False  # eviction jobs paused (top)
        self.paused = []
        self.staged = set()  # ids whose descriptors went ahead (pre-copy)
        self.exported = {}  # session id -> session, quiesced here
        self.refused = []
        self.paused_at = None  # when the first session was quiesced
        self.pause = None  # from then until the new process ran them (the longest pause)
        self.timing = None  # (seconds exporting, then until the taker had adopted them)
        self.spliced = [0, 0]  # directions exported mid-splice, bytes read out of their pipes

    def prepare(self, settle=SETTLE, share=None):
        """Everything up to the commit; HandoverError (after ``abort``) if it fails.

        ``share`` (rebalancing between workers): move at most that many
        sessions and nothing else: no listener, counter, health or bucket."""
        try:
            listeners = stream_listeners(self.app) if share is None else []
            self.wire.send({"op": "listeners", "stream": [lst.text for lst in listeners],
                            "http": [text for text, _ in self.http],
                            "early": carry.early(self.app) if self.top else None},
                           [lst.sock.fileno() for lst in listeners]
                           + [sock.fileno() for _, sock in self.http])
            self.wire.recv(expect="ready")
            self._pause(listeners)
            self._stage(share)
            self.wire.send({"op": "staged"})
            self.wire.recv(expect="staged")  # the taker holds every pre-copied socket
            if self.top:
                carry.hold(self.app)  # no eviction ends a session that is moving
                self.held = True
            self.paused_at = time.monotonic()  # from here on sessions stand still
            self._sessions(self.paused_at + (settle if share is None else 0), share)
            exported = time.monotonic()
            self.wire.send(dict(carry.process_state(self.app) if share is None else {},
                                op="state"))
            reply, _ = self.wire.recv(expect="prepared")
            self.refused = reply.get("refused") or []
            self.timing = (exported - self.paused_at, time.monotonic() - exported)
        except (HandoverError, ValueError) as exc:
            self.abort()
            raise HandoverError(str(exc)) from None
        return len(self.exported) - len(self.refused)

    def _pause(self, listeners):
        gate = self.app.gate
        for lst in listeners:
            if lst.server in gate.servers:
                gate.servers.remove(lst.server)  # a session ending must not resume it
            lst.server.stop_accepting()
            self.paused.append(lst)

    def _stage(self, share):
        """Pre-copy: every relaying session's descriptors, sent while it still relays."""
        batch = _Batches(self.wire, "stage")
        for sid in self.app.registry.ids():
            if share is not None and len(self.staged) >= share:
                break
            session = self.app.registry.handle(sid)
            out = moved.stage(session)  # None: still in its phases, or cannot move
            if out is not None:
                self.staged.add(sid)
                batch.add(*out)
        batch.flush()

    def _sessions(self, deadline, share=None):
        """Quiesce and send each session that can move; rounds until none waits."""
        registry = self.app.registry
        while True:
            batch, waiting = _Batches(self.wire, "sessions"), 0
            for sid in registry.ids():
                if share is not None and len(self.exported) >= share:
                    break
                session = registry.handle(sid)
                if sid in self.exported or session is None:
                    continue
                if session.info.state in ("preread", "connecting"):
                    waiting += 1
                    continue
                out = moved.export(session, sid in self.staged)
                if out is None:
                    continue  # TLS, ending: it ends here as at SIGTERM after the commit
                self.exported[sid] = session
                for i, n in enumerate(handoff.moved_from(out[0]["relay"])):
                    self.spliced[i] += n
                batch.add(*out)
            batch.flush()
            if not waiting or time.monotonic() >= deadline:
                return
            gevent.sleep(0.05)  # sessions still in their phases may start relaying

    def summary(self):
        """The pause and what it carried, for the log line (after ``commit``)."""
        return ("sessions paused for %.3fs at most (exported in %.3fs, adopted %.3fs later; "
                "%d directions were splicing, %d bytes carried out of their pipes)"
                % ((self.pause,) + tuple(self.timing) + tuple(self.spliced)))

    def commit(self):
        """The point of no return: the taker runs every session it did not refuse."""
        self.wire.send({"op": "commit", "carries": self.top})
        try:
            self.wire.recv(expect="committed")
            if self.top:
                carry.send(self.app, self.wire)
        except HandoverError as exc:
            log.error("upgrade: no answer to the commit (%s); the sessions are the new "
                      "process's", exc)
        self.pause = time.monotonic() - self.paused_at
        refused = set(self.refused)
        for sid, session in self.exported.items():
            if sid in refused:
                moved.restart(session)  # ours again: it ends with the others here
            else:
                moved.let_go(session)
        for lst in self.paused:
            lst.close()
        self.wire.close()
        return len(self.exported) - len(refused)

    def abort(self):
        """Keep (or take back) everything: sessions run here again, listeners accept."""
        for session in self.exported.values():
            moved.restart(session)
        self.exported = {}
        if self.held:
            carry.release(self.app)
            self.held = False
        gate = self.app.gate
        for lst in self.paused:
            gate.servers.append(lst.server)
            if not gate.paused:
                lst.server.start_accepting()
        self.paused = []
        try:
            self.wire.send({"op": "abort"})
        except HandoverError:
            pass
        self.wire.close()


# -- the new side ---------------------------------------------------------------------------
class Taker:
    """The new process's (or worker's) end: serve the listeners, adopt, run at commit."""

    def __init__(self, app, wire, on_commit=None):
        self.app = app
        self.wire = wire
        self.adopted = []
        self.staged = {}  # session id -> its two sockets, sent ahead (pre-copy)
        self.early = None  # what came with the listeners (``carry.seed``)
        self.on_commit = on_commit  # called once the sessions run, before "committed"

    def listeners(self):
        """The handed listeners as ``{("stream" | "http", addr text): socket}``."""
        message, fds = self.wire.recv(expect="listeners")
        self.early = message.get("early")
        names = [("stream", a) for a in message["stream"]] + [("http", a) for a in message["http"]]
        if len(names) != len(fds):
            handoff.close_fds(fds)
            raise HandoverError("%d listeners named, %d descriptors" % (len(names), len(fds)))
        return {name: gevent.socket.socket(fileno=fd) for name, fd in zip(names, fds)}

    def take(self):
        """After ``listeners`` and the app serving them: adopt until the commit.

        Returns the number of sessions now running here; HandoverError (having
        dropped every adopted session) if the giver aborts or goes away."""
        self.wire.send({"op": "ready"})
        refused = []
        try:
            while True:
                message, fds = self.wire.recv()
                op = message.get("op")
                if op == "stage":
                    self._stage(message["items"], fds)
                elif op == "staged":
                    self.wire.send({"op": "staged"})
                elif op == "sessions":
                    refused.extend(self._adopt(message["items"], fds))
                elif op == "state":
                    carry.carry_state(self.app, message)
                    self._unstage()  # sessions that ended in the giver meanwhile
                    self.wire.send({"op": "prepared", "refused": refused})
                elif op == "commit":
                    carries = message.get("carries")
                    break
                else:
                    raise HandoverError("the old process called the handover off (%s)" % op)
        except HandoverError:
            for session in self.adopted:
                moved.drop(session)
            self.adopted = []
            self._unstage()
            self.wire.close()
            raise
        self._committed(carries)
        return len(self.adopted)

    def _committed(self, carries):
        """Run every adopted session, answer, then take what the giver carries."""
        balancing = getattr(self.app, "balancing", None)
        for session in self.adopted:
            moved.go(session, balancing)
        if self.on_commit is not None:
            self.on_commit()
        try:  # the sessions are ours whatever happens to the wire from here on
            self.wire.send({"op": "committed"})
        except HandoverError as exc:
            log.error("upgrade: cannot answer the commit (%s)", exc)
        if carries:
            carry.receive(self.app, self.wire)
        self.wire.close()

    def _stage(self, items, fds):
        for i, item in enumerate(items):
            self.staged[item["id"]] = handoff.sockets(fds[2 * i:2 * i + 2])

    def _unstage(self):
        """Close what went ahead and was not adopted: the giver holds (or ended) it."""
        for socks in self.staged.values():
            for sock in socks:
                sock.close()
        self.staged = {}

    def _adopt(self, items, fds):
        app, refused, i = self.app, [], 0
        listeners = {lst.text: lst for lst in app.listeners}
        for state in items:
            sid = state.get("info", {}).get("id")
            if state.get("staged"):
                socks = self.staged.pop(sid, None)
            else:
                socks, i = handoff.sockets(fds[i:i + 2]), i + 2
            try:
                if socks is None:
                    raise HandoverError("its descriptors never came")
                self.adopted.append(moved.adopt(app.proxy, listeners, app.gate, state, socks))
            except Exception:  # a state this version cannot read: the giver keeps it
                log.exception("upgrade: cannot adopt session %s", sid)
                for sock in socks or ():
                    sock.close()
                refused.append(sid)
        return refused
