"""What the relays of one process share: the event queue, the read buffer, the sweeper.

``RelayHub.start`` makes a ``Relay`` (relay.py) and registers it: a live
relay waits in one of the idle sweeper's slots, which are also the registry
of live relays (``RelayHub.relays``, ``close_all``).
"""

import time

import gevent

from gproxy.hub import pause
from gproxy.proxy.relay.events import EventQueue
from gproxy.proxy.relay.relay import Relay

BUFFER_SIZE = 64 * 1024


class RelayHub:
    """The relays of one process: the event queue, the shared buffer, the sweeper.

    The sweeper ends relays that were silent for their idle time, and clean
    ends (``Relay.end_at_boundary``) whose grace ran out.  It does not look at
    every relay every round: each relay waits in the slot (one per
    ``sweep_interval``) in which it could first be due, and a round looks only at the slots that
    came due, moving relays that saw bytes since to a later slot.  A relay is
    looked at about once per idle time, not once a round, so 10,000 quiet
    sessions cost the hub a few hundred checks a second instead of 10,000.
    Bytes moving never touch the slots (``Relay.last`` is all they update).

    A slot is a doubly linked list through its relays (``Relay.slot_prev``,
    ``slot_next``), not a set: two pointers a relay instead of a hash table
    that is up to four times bigger than what it holds (33-105 bytes a
    relay at 1,000-10,000 in a slot), and that never shrinks by itself
    while its slot waits up to the idle time to be swept.
    """

    def __init__(self, loop=None, sweep_interval=1.0):
        self.loop = loop or gevent.get_hub().loop
        self.queue = EventQueue(self.loop)
        self.buffer = bytearray(BUFFER_SIZE)
        self.sweep_interval = sweep_interval
        self._sweeper = None
        self.slots = {}  # slot number -> the first of the live relays that may be due by its end
        self.next_slot = self._slot_of(time.monotonic())  # the first slot not swept yet

    def start(self, client, upstream, info, on_done, idle_timeout=600.0, mqtt=False,
              replayed=b""):
        """Relay between two connected endpoints; ``on_done(relay)`` runs once at the end.

        The endpoints (already non-blocking) become the relay's: it closes them.
        A relay with no byte either way for ``idle_timeout`` seconds is closed
        (nginx proxy_timeout).  ``mqtt``: follow packet boundaries, so
        ``Relay.end_at_boundary`` can end it cleanly.
        """
        return self.run(Relay(self, client, upstream, info, on_done, idle_timeout, mqtt,
                              replayed))

    def run(self, relay):
        """Start ``relay`` (made for this hub: a ``Relay`` or a subclass); returns it."""
        if self._sweeper is None:  # only forward: a killed sweeper may not have died yet
            self.next_slot = max(self.next_slot, self._slot_of(time.monotonic()))
            self._sweeper = gevent.spawn(self._sweep)
        relay.start()
        return relay

    @property
    def relays(self):
        """The live relays."""
        return {relay for first in self.slots.values() for relay in _chain(first)}

    def _slot_of(self, when):
        return int(when // self.sweep_interval)

    def enter(self, relay):
        """A relay starts: it waits in the slot of the end of its idle time."""
        self._put(relay, int((relay.last + relay.idle) // self.sweep_interval))  # once a session

    def leave(self, relay):
        """A relay ends, or moves: out of its slot."""
        slot = relay.slot
        if slot is None:
            return
        before, after = relay.slot_prev, relay.slot_next
        if before is not None:
            before.slot_next = after
        elif after is not None:
            self.slots[slot] = after
        else:
            self.slots.pop(slot, None)  # its last relay: the slot goes
        if after is not None:
            after.slot_prev = before
        relay.slot = relay.slot_prev = relay.slot_next = None

    def schedule(self, relay, when):
        """Have the sweeper look at live ``relay`` in the first round at or after ``when``."""
        if relay.slot is None:
            return  # ended: nothing to look at
        slot = self._slot_of(when)
        if relay.slot != max(slot, self.next_slot):
            self.leave(relay)
            self._put(relay, slot)

    def _put(self, relay, slot):
        if slot < self.next_slot:
            slot = self.next_slot  # that slot was swept already: the next round looks
        first = self.slots.get(slot)
        if first is not None:
            relay.slot = first.slot  # one int object per slot, not one per relay
            first.slot_prev = relay
        else:
            relay.slot = slot
        relay.slot_next = first
        self.slots[slot] = relay

    def _sweep(self):
        while True:
            gevent.sleep(self.sweep_interval)
            self.sweep(time.monotonic())

    def sweep(self, now):
        """End the relays due by ``now``; put the others back in the slot they are next due in.

        A relay is ended by the first round at or after its due time, as
        before slots: up to ``sweep_interval`` late, never early.
        """
        last = self._slot_of(now)
        while self.next_slot <= last:
            slot = self.next_slot
            self.next_slot += 1  # from here on nothing new goes into this slot
            # Each relay looked at leaves this slot (ended, or moved to the slot it is next
            # due in), as do those that end while the round pauses: take the first until
            # none is left.  (No list of 10,000 relays built in one go.)
            while True:
                relay = self.slots.get(slot)
                if relay is None:
                    break
                due = relay.due()
                if due <= now:
                    relay.abort("idle" if relay.deadline is None else "end timed out")
                else:
                    self.schedule(relay, due)
                if self.slots.get(slot) is relay:
                    self.leave(relay)  # (cannot happen: never loop on one relay)
                pause()

    def close_all(self, reason="shutdown"):
        for relay in list(self.relays):
            relay.abort(reason)
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None


def _chain(relay):
    """The relays of one slot, from its first."""
    while relay is not None:
        yield relay
        relay = relay.slot_next
