"""A live relay's state, written out of one process and read back in another.

Live upgrade (SIGUSR2) and ``--workers`` rebalancing move a relayed session
to another process without the client or the broker noticing: the two kernel
sockets travel as descriptors (SCM_RIGHTS, ``runtime.handover``) and this
module turns everything else the relay holds into JSON-ready values and back.
The state is a plain dict (documented in docs/upgrade.md, "The handed
state"); bytes are base64 text:

    {"idle": 90.0, "last": <CLOCK_MONOTONIC seconds, the same in every process>,
     "mqtt": true,
     "up":   {"backlog": bytes | null, "done": bool, "track": {Boundaries slots} | null,
              "mode": "copy" | "body" | "walk" | "all", "piped": int},
     "down": {...},
     "ws":   null | {"parser": {FrameParser slots}, "in": bytes, "out": bytes,
                     "pong": bytes, "eof": bool, "shut": bool, "close_sent": bool,
                     "client_close": int | null}}

``up`` is client -> broker, ``down`` broker -> client.  ``backlog`` is what
the relay read and the other side has not taken yet (bytes that sat in a
splice pipe are read out of it first: ``piped`` of them), ``track`` where the
packet-boundary tracker stands, counted through the backlog (a walk's
position is the tracker: a header it peeked at and did not splice is still
in the socket, and SO_PEEK_OFF is set before every peek, so none is
carried), ``mode`` how the direction moved bytes (for the record: the new
process starts again from COPY and chooses anew on its next read), ``ws``
the WebSocket endpoint's frame parser (mid-frame: its header so far, mask
key and offset) with the unwrapped bytes not yet taken, the frames not yet
written and a Pong waiting behind them.  Bytes still in the kernel's socket
buffers need nothing: the sockets move with them.

``export(relay)`` quiesces a relay (no watcher runs, nothing is lost or
reordered) and returns its state, or None when it cannot move: a TLS
endpoint (OpenSSL's state stays in this process), a relay ending or ended.
``restart(relay)`` undoes a quiesce when the other process failed;
``release(relay)`` drops this process's copy once the other acknowledged
it, without a FIN, a Close frame or a close_notify; ``resume(...)`` builds
the relay in the new process.  Nothing here knows sessions or routes.

What this asks of the relay is kept narrow, so the relay can change under
it: ``Relay.quiesce/restart/release/load`` (relay/moving.py) and
``Direction.export/restore`` (docs/upgrade.md, "What the relay owes the
handover", says what an export must hold, splicing modes included).
"""

import base64
import os

from gproxy.protocols.wsframe import FrameParser
from gproxy.proxy.relay.direction import RawEndpoint
from gproxy.proxy.relay.moving import forget_fd
from gproxy.proxy.relay.relay import Relay
from gproxy.proxy.relay.wsendpoint import WebSocketEndpoint

#: The version of the handed state: a process refuses a handover in another one.
FORMAT = 1
_PLAIN = {bool, int, float, str}


# -- values <-> JSON ----------------------------------------------------------
def pack(value):
    """A slot value as JSON: bytes as base64, tuples kept apart from lists."""
    if value is None or value.__class__ in _PLAIN:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        kind = "ba" if isinstance(value, bytearray) else "b"
        return {kind: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple):
        return {"t": [pack(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError("cannot hand over a %s" % type(value).__name__)


def unpack(value):
    if isinstance(value, dict):
        if "b" in value:
            return base64.b64decode(value["b"])
        if "ba" in value:
            return bytearray(base64.b64decode(value["ba"]))
        return tuple(unpack(v) for v in value["t"])
    return value


def slots_state(obj):
    """Every slot of a small pure-state object (a parser, a tracker), packed."""
    return {name: pack(getattr(obj, name)) for name in type(obj).__slots__}


def load_slots(obj, state):
    for name, value in state.items():
        setattr(obj, name, unpack(value))
    return obj


# -- the old process ------------------------------------------------------------
def movable(relay):
    """True if ``relay`` can be handed to another process as it is now."""
    if relay.reason is not None or relay.deadline is not None or relay.slot is None:
        return False  # ended, or ending cleanly: it finishes here
    if any(d.ending for d in (relay.up, relay.down)):
        return False
    return _raw(relay.upstream) and (
        _raw(relay.client) or (isinstance(relay.client, WebSocketEndpoint)
                               and relay.client.movable()))


def _raw(endpoint):
    return isinstance(endpoint, RawEndpoint)  # a kernel socket, not a TLS or WebSocket wrapper


def export(relay):
    """Quiesce ``relay`` and return its state, or None (left running) if it cannot move."""
    if not movable(relay):
        return None
    relay.quiesce()
    state = {"idle": relay.idle, "last": relay.last, "mqtt": relay.up.track is not None,
             "up": _direction(relay.up.export()), "down": _direction(relay.down.export()),
             "ws": None}
    if isinstance(relay.client, WebSocketEndpoint):
        ws = relay.client.export()
        parser = slots_state(ws.pop("parser"))
        state["ws"] = {key: pack(value) for key, value in ws.items()}
        state["ws"]["parser"] = parser
    return state


def _direction(raw):
    track = raw["track"]
    return {"backlog": pack(raw["backlog"]), "done": raw["done"],
            "track": None if track is None else slots_state(track),
            "mode": raw["mode"], "piped": raw["piped"]}


def descriptors(relay):
    """The two kernel sockets to send: the client's (under any WebSocket framing), the node's."""
    client = relay.client
    return (getattr(client, "sock", client).fileno(), relay.upstream.fileno())


def restart(relay):
    """The handover failed: run the quiesced relay here again, as if nothing happened."""
    if isinstance(relay.client, WebSocketEndpoint):
        relay.client.restart()
    relay.restart()


def release(relay):
    """The other process owns the session now: drop ours without telling anyone."""
    if isinstance(relay.client, WebSocketEndpoint):
        forget_fd(relay.hub.loop, relay.client.sock.fileno())
        relay.client.release()
    relay.release()


# -- the new process ------------------------------------------------------------
def sockets(fds):
    """Kernel sockets for two received descriptors (the client's, the node's)."""
    out = tuple(RawEndpoint(fileno=fd) for fd in fds)
    for sock in out:
        sock.setblocking(False)
    return out


def endpoints(socks, state, loop=None):
    """The relay's client and upstream endpoints: ``socks`` with the client's
    WebSocket framing, if it had one, restored on top."""
    client, upstream = socks
    ws = state.get("ws")
    if ws is not None:
        ws = dict(ws)
        parser = load_slots(FrameParser.__new__(FrameParser), ws.pop("parser"))
        ws = {key: unpack(value) for key, value in ws.items()}
        client = WebSocketEndpoint.restored(client, parser, ws, loop)
    return client, upstream


def resume(hub, client, upstream, info, on_done, state):
    """A plain ``Relay`` for a handed session, on ``hub``, from where the old one
    stopped (not started: ``relay.start()`` once its session is registered)."""
    return load(Relay(hub, client, upstream, info, on_done, state["idle"], state["mqtt"]),
                state)


def load(relay, state):
    """Bring ``relay`` (just built, for the same endpoints, ``idle`` and ``mqtt``:
    a ``Relay`` or the session room's subclass) to where the handed one stood."""
    up, down = state["up"], state["down"]
    relay.load(state["last"], (unpack(up["backlog"]), up["done"]),
               (unpack(down["backlog"]), down["done"]))
    for d, raw in ((relay.up, up), (relay.down, down)):
        if d.track is not None and raw["track"] is not None:
            load_slots(d.track, raw["track"])
    return relay


def moved_from(state):
    """``(directions that were splicing, bytes read out of their pipes)`` of a
    handed state: what the handover's log line reports."""
    dirs = (state["up"], state["down"])
    return (sum(d.get("mode", "copy") != "copy" for d in dirs),
            sum(d.get("piped", 0) for d in dirs))


def close_fds(fds):
    """Descriptors received for a session that will not be resumed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
