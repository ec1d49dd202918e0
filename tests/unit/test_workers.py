"""The parent's side of ``--workers``: shipping changes, failures, dead workers.

Workers here are ``serve_control`` loops on one end of Unix socketpairs, each
with a real ``Tables`` over a real route table (only the fork is left out), so
what a worker applies is what the parent sent.  Checked: changes go out as
they are (in chunks), not as the whole table; a worker that fails to apply
them is sent the whole table, and when that fails too the parent says so
(``NotApplied``, which the Admin API answers with 503) and keeps trying until
the worker takes it; a worker that exits is noticed and logged with its
status; a worker that fails inside says why before it exits (a real fork).
"""

import logging
import os
import re
import signal

import gevent
import gevent.socket
import pytest

from gproxy.errors import NotApplied
from gproxy.model.routes import RouteTable
from gproxy.proxy.sessions.registry import Registry
from gproxy.runtime.channel import Channel, LineReader
from gproxy.runtime.merged import CHUNK, WorkerSet
from gproxy.runtime.tables import Tables
from gproxy.runtime.workers import _run_worker, serve_control


class Proxy:
    def __init__(self):
        self.table, self.certs = RouteTable(), None


class Health:
    def sync(self, table, names=None):
        pass


class WorkerApp:
    """A worker's Gproxy as serve_control and Tables use it; ``fail`` makes it refuse."""

    def __init__(self):
        self.registry = Registry(worker=1)
        self.proxy, self.health = Proxy(), Health()
        self.cfg = {"gproxy.balancer.chash_ring": "apisix",
                    "apisix.ssl.ssl_trusted_certificate": "system"}
        self.tables = Tables(self, pause=lambda: None)
        self.fail = 0  # how many more applies fail
        self.messages = []
        real = self.tables.apply

        def apply(changes):
            self.messages.append(len(changes))
            if self.fail:
                self.fail -= 1
                raise MemoryError("out of memory")
            real(changes)
        self.tables.apply = apply


@pytest.fixture
def workers():
    made, loops = [], []
    store = {}  # the parent's data: (kind, id) -> value

    def everything():
        return [(kind, id_, value) for (kind, id_), value in store.items()]

    for pid in (101, 102):
        parent, child = gevent.socket.socketpair()
        app = WorkerApp()
        loops.append(gevent.spawn(serve_control, app, child))
        made.append((Channel(pid, parent), app))
    yield WorkerSet([ch for ch, _ in made], everything=everything), made, store
    for loop in loops:
        loop.kill()


def put(store, kind, id_, value):
    store[(kind, id_)] = value
    return [(kind, id_, value)]


def ids(app):
    return sorted(app.proxy.table.upstreams)


def test_changes_go_out_as_they_are(workers):
    ws, made, store = workers
    ws.push_changes(put(store, "upstreams", "1", {"id": "1", "nodes": {"127.0.0.1:1": 1}}))
    many = []
    for n in range(2, 2 + CHUNK + 10):
        many += put(store, "upstreams", str(n), {"id": str(n), "nodes": {"127.0.0.1:1": 1}})
    ws.push_changes(many)
    for _, app in made:
        assert app.messages == [1, CHUNK, 10]  # deltas, in chunks: never the whole table
        assert len(ids(app)) == CHUNK + 11


def test_a_worker_that_fails_to_apply_is_sent_the_whole_table(workers, caplog):
    ws, made, store = workers
    ws.push_changes(put(store, "upstreams", "1", {"id": "1", "nodes": {"127.0.0.1:1": 1}}))
    made[1][1].fail = 1
    with caplog.at_level(logging.ERROR, logger="gproxy.workers"):
        ws.push_changes(put(store, "upstreams", "2", {"id": "2", "nodes": {"127.0.0.1:2": 1}}))
    assert "worker 102 failed to apply 1 change(s): out of memory; sending it the whole " \
           "table" in caplog.text
    assert ids(made[0][1]) == ids(made[1][1]) == ["1", "2"]
    assert ws.stale == {}


def test_a_worker_that_cannot_take_the_table_is_named_until_it_does(workers, caplog):
    """Before: the parent logged the failure, the Admin API answered 200 and the
    worker went on serving the old table without a word."""
    ws, made, store = workers
    made[1][1].fail = 2
    with pytest.raises(NotApplied, match="^the change is stored, but worker 102 failed to "
                                         "apply it: out of memory; it serves the previous "
                                         "route table until it takes the whole table$"):
        ws.push_changes(put(store, "upstreams", "1", {"id": "1", "nodes": {"127.0.0.1:1": 1}}))
    assert ids(made[0][1]) == ["1"] and ids(made[1][1]) == []
    assert set(ws.stale) == {102}
    with caplog.at_level(logging.WARNING, logger="gproxy.workers"):
        ws.converge()
    assert "worker 102 took the whole table" in caplog.text
    assert ids(made[1][1]) == ["1"] and ws.stale == {}
    ws.push_changes(put(store, "upstreams", "2", {"id": "2", "nodes": {"127.0.0.1:2": 1}}))


def test_the_whole_table_drops_what_the_worker_should_not_have(workers):
    ws, made, store = workers
    for n in range(3):
        ws.push_changes(put(store, "stream_routes", "r%d" % n, {"id": "r%d" % n}))
    del store[("stream_routes", "r1")]
    made[1][1].fail = 1  # the delete fails there: the whole table follows
    ws.push_changes([("stream_routes", "r1", None)])
    assert made[1][1].proxy.table.route_ids() == ["r0", "r2"]


def test_a_worker_that_exited_is_reported_and_left_out(caplog):
    pids = []
    for code in (3, None):
        pid = os.fork()
        if pid == 0:
            if code is None:
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(code)
        pids.append(pid)
    channels = []
    for pid in pids:
        a, b = gevent.socket.socketpair()
        b.close()
        channels.append(Channel(pid, a))
    ws = WorkerSet(channels)
    deadline = gevent.Timeout(10)
    deadline.start()
    try:
        with caplog.at_level(logging.ERROR, logger="gproxy.workers"):
            while ws.channels:
                ws.reap()
                gevent.sleep(0.02)
    finally:
        deadline.cancel()
    # The two may be reaped in either order: each line counts the ones left then.
    assert re.search(r"worker %d exited with status 3; [01] worker\(s\) left serving"
                     % pids[0], caplog.text)
    assert re.search(r"worker %d killed by signal 9; [01] worker\(s\) left serving"
                     % pids[1], caplog.text)
    assert "; 0 worker(s) left serving" in caplog.text


class BrokenApp:
    """A worker whose start fails with an exception nobody expected."""

    def start_worker(self, index):
        raise RuntimeError("boom while starting")


def test_a_worker_that_dies_of_an_exception_says_so(tmp_path):
    """Before: ``except BaseException: code = 1`` and os._exit, without a line."""
    log_path = tmp_path / "worker.log"
    parent, child = gevent.socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the worker: log to a file, as the gproxy command logs to stderr
        try:
            handler = logging.FileHandler(log_path)
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            logging.getLogger("gproxy.workers").addHandler(handler)
            parent.close()
            _run_worker(BrokenApp(), 0, child)
        finally:
            os._exit(99)  # not reached: _run_worker exits itself
    child.close()
    _, status = os.waitpid(pid, 0)
    reader = LineReader(parent)
    with gevent.Timeout(5):
        assert reader.readline() == b'{"error":"boom while starting"}'
    parent.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1
    text = log_path.read_text()
    assert "ERROR worker 0 (pid %d) failed; exiting" % pid in text
    assert "RuntimeError: boom while starting" in text
