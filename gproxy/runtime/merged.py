"""The parent's view of its workers (``--workers N``): sessions, and the table they serve.

``WorkerSet`` offers what the Admin API reads from one process's
``LiveSessions`` (``query``, ``select``, ``stats``, ``close``, ``end_many``,
``evictions``), asking every worker over its control channel
(all at once) and merging the answers; a worker that does not answer is
logged and left out of that answer.  A page of sessions spans the workers:
each returns its first ``offset + limit`` matches in the same order and the
parent merges them (a heap merge, ties in worker order) and cuts the page;
totals add up.  Evictions are paced here and each batch goes to every
worker, which ends the sessions it holds: a session keeps its id when a live
upgrade or a rebalance moves it, so an id's pid no longer names its worker.
It also drives the workers' side of a live upgrade (``hand_over``,
``commit_handover``) and of rebalancing (``live_counts``, ``give_share``).

Store changes reach the workers as they are, in chunks (``push_changes``),
never as the whole table.  A worker that cannot apply them (an error, or no
answer) is sent the whole table at once (``resync``); if that fails too it
is marked stale, ``NotApplied`` names it (the Admin API answers 503: the
change is stored, that worker serves the previous table), and ``converge``
(the runtime's store loop) keeps trying until it takes.  ``reap`` notices a
worker that exited, says how, and leaves it out from then on.
"""

import logging
import os
import shutil
import signal
import time
from collections import Counter

import gevent

from gproxy.errors import NotApplied
from gproxy.model.health import merge_reports
from gproxy.protocols.mqttstream import USE_ANOTHER_SERVER
from gproxy.proxy.sessions.evict import Evictions
from gproxy.proxy.sessions.live import check_spec, merge_pages
from gproxy.runtime.channel import ACK_TIMEOUT
from gproxy.runtime.wire import STEP_TIMEOUT, HandoverError

log = logging.getLogger("gproxy.workers")
HANDOVER_TIMEOUT = 4 * STEP_TIMEOUT  # listeners, ready, sessions, prepared
CHUNK = 256  # changes per control message


def merge_stats(replies, workers):
    """One stats dict from every worker's: numbers and per-key counts summed,
    the start time the earliest."""
    merged = {}
    started = []
    for reply in replies:
        for key, value in reply.items():
            if key in ("id", "started_at"):
                continue
            if isinstance(value, dict):
                merged.setdefault(key, Counter()).update(value)
            else:
                merged[key] = merged.get(key, 0) + value
        started.append(reply["started_at"])
    out = {key: dict(v) if isinstance(v, Counter) else v for key, v in merged.items()}
    out.update(started_at=min(started, default=0), workers=workers)
    return out


class WorkerSet:
    """The parent's view of its workers; quacks like a Registry for the Admin API."""

    def __init__(self, channels, grace=5.0, server_reference=None, everything=list,
                 folder=None):
        self.channels = channels
        self.index = {ch.pid: i for i, ch in enumerate(channels)}  # pid -> worker index
        self.folder = folder  # the workers' import sockets (rebalancing); removed at stop
        self.rebalancer = None
        self.grace = grace
        self.server_reference = server_reference
        self.everything = everything  # () -> every stored object as a change, in load order
        self.stale = {}  # pid -> why its table is behind
        self.evictions = Evictions(self.select, self.end_many)

    def _one(self, ch, message, timeout=ACK_TIMEOUT):
        try:
            reply = ch.call(message, timeout)
        except (OSError, gevent.Timeout) as exc:
            log.error("worker %d did not answer %s: %s", ch.pid, message["op"], exc)
            return None
        if "error" in reply:
            log.error("worker %d failed %s: %s", ch.pid, message["op"], reply["error"])
            return None
        return reply

    def _all(self, message, channels=None, timeout=ACK_TIMEOUT):
        calls = [gevent.spawn(self._one, ch, message, timeout)
                 for ch in channels or self.channels]
        gevent.joinall(calls)
        return [call.value for call in calls if call.value is not None]

    def _failures(self, message, channels):
        """``{channel: reason}`` for the channels that did not apply ``message``."""
        calls = {ch: gevent.spawn(_apply, ch, message) for ch in channels}
        gevent.joinall(list(calls.values()))
        return {ch: call.value for ch, call in calls.items() if call.value is not None}

    def push_changes(self, changes):
        """Make ``changes`` live in every worker, or raise NotApplied naming who has not."""
        failed = {}
        for start in range(0, len(changes), CHUNK):
            ok = [ch for ch in self.channels if ch not in failed]
            failed.update(self._failures({"op": "changes",
                                          "changes": changes[start:start + CHUNK]}, ok))
        for ch, reason in failed.items():
            log.error("worker %d failed to apply %d change(s): %s; sending it the whole "
                      "table", ch.pid, len(changes), reason)
        self.resync([ch for ch in self.channels if ch in failed or ch.pid in self.stale])
        if self.stale:
            raise NotApplied("the change is stored, but %s; %s" % (
                "; ".join("worker %d failed to apply it: %s" % item
                          for item in self.stale.items()),
                "it serves the previous route table until it takes the whole table"))

    def resync(self, channels):
        """Send ``channels`` the whole table; they are stale until one takes it."""
        if not channels:
            return
        items = self.everything()
        chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)] or [[]]
        failed = {}
        for n, chunk in enumerate(chunks):
            ok = [ch for ch in channels if ch not in failed]
            failed.update(self._failures({"op": "resync", "changes": chunk, "first": n == 0,
                                          "last": n == len(chunks) - 1}, ok))
        for ch in channels:
            if ch in failed:
                if ch.pid not in self.stale:
                    log.error("worker %d failed to take the whole table: %s; it serves the "
                              "previous route table", ch.pid, failed[ch])
                self.stale[ch.pid] = failed[ch]
            elif self.stale.pop(ch.pid, None) is not None:
                log.warning("worker %d took the whole table: it serves the current routes "
                            "again", ch.pid)

    def converge(self):
        """Retry the stale workers (called now and then by the runtime)."""
        self.resync([ch for ch in self.channels if ch.pid in self.stale])

    def reap(self):
        """Notice workers that exited: log how, and leave them out from now on."""
        for ch in list(self.channels):
            try:
                pid, status = os.waitpid(ch.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = ch.pid, None
            if not pid:
                continue
            how = ("killed by signal %d" % os.WTERMSIG(status) if status is not None
                   and os.WIFSIGNALED(status) else "exited with status %s"
                   % (os.WEXITSTATUS(status) if status is not None else "unknown"))
            self.channels.remove(ch)
            self.stale.pop(ch.pid, None)
            ch.close()
            log.error("worker %d %s; %d worker(s) left serving", ch.pid, how,
                      len(self.channels))

    def stats(self):
        return merge_stats(self._all({"op": "stats"}), len(self.channels))

    def close(self, session_id):
        return any(r.get("closed") for r in self._all({"op": "close", "sid": session_id}))

    def query(self, spec):
        """One page over every worker's sessions (see the module docstring)."""
        check_spec(spec)
        offset, limit = spec.get("offset", 0), spec.get("limit")
        ask = dict(spec, offset=0, limit=None if limit is None else offset + limit)
        return merge_pages(self._all({"op": "query", "spec": ask}), spec)

    def select(self, spec):
        check_spec(spec)
        ids = []
        for reply in self._all({"op": "select", "spec": spec}):
            ids.extend(reply["ids"])
        return ids

    def end_many(self, ids, code=USE_ANOTHER_SERVER, grace=None, server_reference=None):
        """End ``ids`` cleanly.  Every worker is asked about every id (it ends
        those it holds): a session keeps its id when a live upgrade or a
        rebalance moves it, so the pid in an id no longer says where it lives."""
        by_pid = {}
        for sid in ids:
            by_pid.setdefault(sid.partition("-")[0], []).append(sid)
        ended = failed = 0
        for ch in self.channels if ids else ():
            reply = self._one(ch, {
                "op": "end_many", "sids": list(ids), "code": code,
                "grace": self.grace if grace is None else grace,
                "server_reference": (self.server_reference if server_reference is None
                                     else server_reference)})
            if reply is None:
                failed += len(by_pid.get(str(ch.pid), ()))
            else:
                ended += reply["ended"]
        return {"ended": ended, "failed": failed}

    # -- live upgrade (runtime.upgrade) -------------------------------------
    def hand_over(self, paths):
        """Each worker gives its listeners and sessions to the new worker at
        ``paths[i]``, up to the commit; if one fails, all take theirs back."""
        if len(paths) != len(self.index):  # (a worker that died keeps its index)
            raise HandoverError("the new process has %d workers, this one %d"
                                % (len(paths), len(self.index)))
        calls = [gevent.spawn(self._one, ch, {"op": "handover",
                                              "path": paths[self.index[ch.pid]]},
                              HANDOVER_TIMEOUT) for ch in self.channels]
        gevent.joinall(calls)
        if any(call.value is None for call in calls):
            self._all({"op": "handover_abort"}, timeout=HANDOVER_TIMEOUT)
            raise HandoverError("a worker could not hand over (see its line above)")

    def live_counts(self):
        """Live sessions per worker, in worker order; None if one did not answer."""
        replies = [self._one(ch, {"op": "stats"}) for ch in self.channels]
        if any(reply is None for reply in replies):
            return None
        return [reply["live_sessions"] for reply in replies]

    def give_share(self, index, path, share):
        """Worker ``index`` gives up to ``share`` sessions to the worker at ``path``."""
        return self._one(self.channels[index], {"op": "rebalance_give", "path": path,
                                                "share": share}, HANDOVER_TIMEOUT)

    def commit_handover(self):
        replies = self._all({"op": "handover_commit"}, timeout=HANDOVER_TIMEOUT)
        return sum(reply.get("moved", 0) for reply in replies)

    def __len__(self):
        return sum(r["live_sessions"] for r in self._all({"op": "stats"}))

    def health(self):
        """Every worker's health checkers, merged (``model.health.merge_reports``)."""
        return merge_reports([reply["list"] for reply in self._all({"op": "health"})])

    def reopen(self):
        """Every worker reopens its access log (SIGUSR1)."""
        self._all({"op": "reopen"})

    def reload(self, cfg, log_level=None):
        self._all({"op": "reload", "raw": cfg.raw, "path": cfg.path, "log_level": log_level})

    def stop(self, timeout):
        """Tell every worker to drain within ``timeout`` s, then wait for them to exit.

        Killed (by a second signal) while waiting, the caller calls ``force``.
        """
        self._forget()
        for ch in self.channels:
            try:
                ch.call({"op": "stop", "timeout": timeout}, timeout=5)
            except (OSError, gevent.Timeout):
                pass
        self._reap(timeout + 5)

    def _forget(self):
        if self.rebalancer is not None:
            self.rebalancer.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def force(self):
        """A drain is under way: have every worker close what is left, now."""
        self._forget()
        for ch in self.channels:
            try:
                ch.sock.sendall(b'\n{"op":"stop","timeout":0}\n')
            except OSError:
                pass
        self._reap(5)

    def _reap(self, timeout):
        deadline = time.monotonic() + timeout
        waiting = [ch for ch in self.channels]
        while waiting:
            for ch in list(waiting):
                try:
                    pid, _ = os.waitpid(ch.pid, os.WNOHANG)
                except ChildProcessError:
                    pid = ch.pid
                if pid:
                    waiting.remove(ch)
                    ch.close()
            if waiting and time.monotonic() >= deadline:
                for ch in waiting:
                    log.error("worker %d did not exit in time; killing it", ch.pid)
                    os.kill(ch.pid, signal.SIGKILL)
                deadline = float("inf")
            elif waiting:
                gevent.sleep(0.05)
        self.channels = []


def _apply(ch, message):
    """None once the worker has applied ``message``, else why not."""
    try:
        reply = ch.call(message)
    except (OSError, gevent.Timeout) as exc:
        return "no answer: %s" % (exc,)
    return reply.get("error") if "error" in reply else None
