"""gproxy.store.FileStore against docs/apisix-behaviour.md §7 (standalone YAML).

The file is read back with PyYAML and by a second FileStore, never compared with
gproxy's own renderer.  Hand edits are written the way an operator would (plain
open/write) with the mtime pushed forward so a coarse clock cannot hide them.
Writes go to the journal first and reach the YAML file when it is folded in
(``fold()``, or a second without writes); the journal's own cases (torn
entries, group commit, folding) follow the hand-edit ones.
"""

import json
import logging
import os
import re
import time

import pytest
import yaml

from gproxy.store import journal
from gproxy.store.file import FileStore

UPSTREAM = {"id": "1", "type": "roundrobin", "nodes": {"127.0.0.1:1995": 1}}
ROUTE = {"id": "1", "server_port": 1985, "upstream_id": "1",
         "plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}}}
ROUTE2 = {"id": "r2", "remote_addr": "10.0.0.0/8",
          "upstream": {"type": "chash", "key": "mqtt_client_id",
                       "nodes": [{"host": "127.0.0.1", "port": 1995, "weight": 1}]}}

APISIX_FILE = """\
stream_routes:
  - server_addr: 127.0.0.1
    server_port: 1985
    id: 1
    upstream_id: 1
    plugins:
      mqtt-proxy:
        protocol_name: "MQTT"
        protocol_level: 4
upstreams:
  - nodes:
      "127.0.0.1:1995": 1
    type: roundrobin
    id: 1
#END
"""


@pytest.fixture
def path(tmp_path):
    return tmp_path / "apisix.yaml"


@pytest.fixture
def store(path):
    """Upstream 1 and route 1, folded into the file (no journal left)."""
    s = FileStore(path)
    s.put("upstreams", "1", dict(UPSTREAM))
    s.put("stream_routes", "1", dict(ROUTE))
    s.fold()
    return s


def data(store):
    return {kind: {r.id: r.value for r in store.list(kind)}
            for kind in ("stream_routes", "upstreams")}


def hand_edit(path, text):
    """Rewrite the file as an editor would; make sure size or mtime moves."""
    before = os.stat(path)
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))


class Calls:
    def __init__(self):
        self.count = 0
        self.changes = []

    def __call__(self, changes):
        self.count += 1
        self.changes.append([(kind, id_, None if rec is None else rec.value)
                             for kind, id_, rec in changes])


# -- basics -------------------------------------------------------------------------

def test_starts_empty_without_a_file(path):
    store = FileStore(path)
    assert store.list("stream_routes") == [] and store.list("upstreams") == []
    assert store.get("stream_routes", "1") is None
    assert not path.exists()  # nothing is written until the first change
    assert store.poll() is False


def test_put_get_list_delete(path):
    store = FileStore(path)
    record, created = store.put("upstreams", "1", dict(UPSTREAM))
    assert created is True
    assert record.key == "/apisix/upstreams/1" and record.value == UPSTREAM
    record, created = store.put("stream_routes", 1, dict(ROUTE))
    assert created is True and record.id == "1"
    assert store.get("stream_routes", 1).value == ROUTE
    assert store.get("stream_routes", "1").value == ROUTE
    assert [r.id for r in store.list("stream_routes")] == ["1"]

    first = store.get("stream_routes", "1")
    record, created = store.put("stream_routes", "1", dict(ROUTE, server_port=1986))
    assert created is False
    assert record.created_index == first.created_index
    assert record.modified_index > first.modified_index
    assert store.get("stream_routes", "1").value["server_port"] == 1986

    removed = store.delete("stream_routes", "1")
    assert removed.key == "/apisix/stream_routes/1"
    assert store.get("stream_routes", "1") is None
    assert store.delete("stream_routes", "1") is None


def test_file_is_apisix_standalone_yaml(store, path):
    store.put("stream_routes", "r2", dict(ROUTE2))
    store.fold()
    text = path.read_text()
    assert text.endswith("#END\n")
    assert "#END" in text[-10:] and text.rstrip().endswith("#END")  # APISIX's end flag rule
    doc = yaml.safe_load(text)
    assert isinstance(doc["stream_routes"], list) and isinstance(doc["upstreams"], list)
    assert doc["stream_routes"] == [ROUTE, ROUTE2]
    assert doc["upstreams"] == [UPSTREAM]
    items = [line for line in text.splitlines() if line.startswith("- ")]
    assert [json.loads(line[2:]) for line in items] == [ROUTE, ROUTE2, UPSTREAM]  # one a line


def test_deleting_everything_keeps_a_valid_file(store, path):
    store.delete("stream_routes", "1")
    store.delete("upstreams", "1")
    store.fold()
    doc = yaml.safe_load(path.read_text())
    assert not doc.get("stream_routes") and not doc.get("upstreams")
    assert path.read_text().endswith("#END\n")
    assert data(FileStore(path)) == {"stream_routes": {}, "upstreams": {}}


def test_reopen_loads_the_same_records(store, path):
    store.put("stream_routes", "r2", dict(ROUTE2))
    store.put("upstreams", "00000000000000000042",
              {"id": "00000000000000000042", "nodes": {"[::1]:1883": 2}})
    again = FileStore(path)
    assert data(again) == data(store)
    assert [r.id for r in again.list("stream_routes")] == ["1", "r2"]


def test_reopen_keeps_integer_ids(path):
    store = FileStore(path)
    store.put("stream_routes", "1", {"id": 1, "server_port": 1985})
    assert FileStore(path).get("stream_routes", "1").value == {"id": 1, "server_port": 1985}


def test_no_temp_files_left(store, path):
    for n in range(5):
        store.put("stream_routes", str(n), {"id": str(n), "server_port": 1000 + n})
    store.delete("stream_routes", "3")
    assert sorted(os.listdir(path.parent)) == [path.name, path.name + ".journal"]
    store.fold()
    assert os.listdir(path.parent) == [path.name]


def no_space(*args):
    raise OSError(28, "No space left on device")


def test_failed_write_changes_nothing(store, path, monkeypatch):
    calls = Calls()
    store.subscribe(calls)
    raw, before = path.read_bytes(), data(store)
    monkeypatch.setattr(os, "fdatasync", no_space)
    with pytest.raises(OSError):
        store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    with pytest.raises(OSError):
        store.put("stream_routes", "1", dict(ROUTE, server_port=9))
    with pytest.raises(OSError):
        store.delete("stream_routes", "1")
    assert path.read_bytes() == raw
    assert data(store) == before
    assert calls.count == 0
    assert os.listdir(path.parent) == [path.name]  # the journal the failure began is gone
    monkeypatch.undo()
    assert data(FileStore(path)) == before
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})  # and writes work again
    store.fold()
    assert FileStore(path).get("stream_routes", "2") is not None


def test_a_failed_append_is_cut_off_the_journal(store, path, monkeypatch):
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    journal_path = path.parent / (path.name + ".journal")
    size = journal_path.stat().st_size
    calls = []

    def fails_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            no_space()

    monkeypatch.setattr(os, "fdatasync", fails_once)
    with pytest.raises(OSError):
        store.put("stream_routes", "3", {"id": "3", "server_port": 3})
    assert journal_path.stat().st_size == size
    store.put("stream_routes", "4", {"id": "4", "server_port": 4})
    monkeypatch.undo()
    store.fold()
    again = FileStore(path)
    assert sorted(r.id for r in again.list("stream_routes")) == ["1", "2", "4"]


def test_a_failed_fold_keeps_the_journal(store, path, monkeypatch, caplog):
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    monkeypatch.setattr(os, "replace", no_space)
    with caplog.at_level(logging.ERROR, logger="gproxy.store"):
        store.fold()
    assert "could not fold" in caplog.text
    monkeypatch.undo()
    assert FileStore(path).get("stream_routes", "2").value == {"id": "2", "server_port": 2}


# -- hand edits: poll() ------------------------------------------------------------

def test_valid_hand_edit_is_picked_up(store, path):
    calls = Calls()
    store.subscribe(calls)
    created = store.get("stream_routes", "1").created_index
    doc = yaml.safe_load(path.read_text())
    doc["stream_routes"].append({"id": "hand", "server_port": 1999})
    hand_edit(path, yaml.safe_dump(doc) + "#END\n")
    assert store.poll() is True
    assert calls.count == 1
    assert calls.changes == [[("stream_routes", "hand", {"id": "hand", "server_port": 1999})]]
    assert store.get("stream_routes", "hand").value == {"id": "hand", "server_port": 1999}
    assert store.get("stream_routes", "1").value == ROUTE
    assert store.get("stream_routes", "1").created_index == created
    assert store.poll() is False  # nothing new since
    assert calls.count == 1


def test_hand_edit_in_apisix_layout(store, path):
    hand_edit(path, APISIX_FILE)
    assert store.poll() is True
    route = store.get("stream_routes", "1").value
    assert route["server_addr"] == "127.0.0.1" and route["upstream_id"] == 1
    assert store.get("upstreams", "1").value["nodes"] == {"127.0.0.1:1995": 1}


def test_hand_edit_removing_a_route(store, path):
    hand_edit(path, "stream_routes: []\n"
                    "upstreams:\n  - id: '1'\n    nodes: {'127.0.0.1:1995': 1}\n#END\n")
    assert store.poll() is True
    assert store.list("stream_routes") == []


BROKEN_EDITS = {
    "broken yaml": "stream_routes: [\n  {id: 1, server_port: \n#END\n",
    "missing end flag": "stream_routes:\n  - id: '9'\n    server_port: 1999\n",
    "invalid item": ("stream_routes:\n  - id: '9'\n    server_port: 70000\n"
                     "  - id: '10'\n    server_port: 1999\n#END\n"),
    "not a mapping": "- 1\n- 2\n#END\n",
}


@pytest.mark.parametrize("text", BROKEN_EDITS.values(), ids=BROKEN_EDITS.keys())
def test_broken_hand_edit_is_ignored_and_logged(store, path, caplog, text):
    calls = Calls()
    store.subscribe(calls)
    before = data(store)
    hand_edit(path, text)
    with caplog.at_level(logging.ERROR, logger="gproxy.store"):
        assert store.poll() is False
    assert data(store) == before
    assert calls.count == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "a rejected edit must be logged"
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="gproxy.store"):
        assert store.poll() is False  # reported once, not on every poll
    assert not caplog.records


def test_invalid_item_edit_logs_apisix_line(store, path, caplog):
    hand_edit(path, BROKEN_EDITS["invalid item"])
    with caplog.at_level(logging.ERROR, logger="gproxy.store"):
        store.poll()
    assert "failed to check item data of [stream_routes] err:" in caplog.text


def test_missing_end_flag_edit_logs_apisix_line(store, path, caplog):
    hand_edit(path, BROKEN_EDITS["missing end flag"])
    with caplog.at_level(logging.ERROR, logger="gproxy.store"):
        store.poll()
    assert "missing valid end flag in file" in caplog.text


def test_broken_edit_then_fixed_edit(store, path):
    hand_edit(path, BROKEN_EDITS["broken yaml"])
    assert store.poll() is False
    hand_edit(path, APISIX_FILE)
    assert store.poll() is True
    assert store.get("stream_routes", "1").value["server_port"] == 1985


def test_own_writes_do_not_trigger_a_reload(store, path):
    calls = Calls()
    store.subscribe(calls)
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    store.delete("stream_routes", "2")
    assert calls.count == 2  # once per change, from the write itself
    assert calls.changes == [[("stream_routes", "2", {"id": "2", "server_port": 2})],
                             [("stream_routes", "2", None)]]
    assert store.poll() is False
    store.fold()
    assert store.poll() is False  # our own fold is no hand edit
    assert calls.count == 2


def test_poll_after_the_file_is_removed(store, path):
    before = data(store)
    path.unlink()
    assert store.poll() is False
    assert data(store) == before


# -- startup ------------------------------------------------------------------------

def test_startup_skips_invalid_items(path, caplog):
    path.write_text(
        "stream_routes:\n"
        "  - id: 1\n    server_port: 70000\n"
        "  - id: 2\n    server_port: 1985\n"
        "  - id: 3\n    plugins: {mqtt-proxy: {protocol_name: MQTT}}\n"
        "upstreams:\n"
        "  - id: 1\n    nodes: {'127.0.0.1:1995': 1}\n"
        "  - id: 2\n    type: chash\n    nodes: {'127.0.0.1:1995': 1}\n"
        "#END\n")
    with caplog.at_level(logging.ERROR, logger="gproxy.store"):
        store = FileStore(path)
    assert [r.id for r in store.list("stream_routes")] == ["2"]
    assert [r.id for r in store.list("upstreams")] == ["1"]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("failed to check item data of [stream_routes] err:" in m for m in lines) == 2
    assert sum("failed to check item data of [upstreams] err:" in m for m in lines) == 1
    assert any('property "server_port" validation failed' in m for m in lines)


def test_startup_loads_the_apisix_docs_example(path):
    path.write_text(APISIX_FILE)
    store = FileStore(path)
    assert store.get("stream_routes", "1").value["plugins"]["mqtt-proxy"]["protocol_level"] == 4
    assert store.get("upstreams", "1") is not None


def test_startup_keeps_a_route_whose_upstream_is_missing(path):
    path.write_text("stream_routes:\n  - id: 1\n    server_port: 1985\n    upstream_id: 9\n#END\n")
    assert FileStore(path).get("stream_routes", "1") is not None


# -- ids for POST --------------------------------------------------------------------

def test_new_id_is_20_digits_and_monotonic(path):
    store = FileStore(path)
    ids = [store.new_id() for _ in range(3)]
    store.put("stream_routes", ids[-1], {"id": ids[-1]})
    ids += [store.new_id() for _ in range(2)]
    assert all(re.fullmatch(r"\d{20}", i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_new_id_after_reopen_does_not_reuse_ids(path):
    store = FileStore(path)
    used = []
    for _ in range(4):
        new_id = store.new_id()
        store.put("stream_routes", new_id, {"id": new_id})
        used.append(new_id)
    store.delete("stream_routes", used[-1])  # a deleted id must not come back either
    again = FileStore(path)
    fresh = [again.new_id() for _ in range(10)]
    assert min(fresh) > max(used)
    assert not set(fresh) & set(used)


def test_new_id_skips_ids_in_an_apisix_file(path):
    path.write_text(
        "stream_routes:\n"
        "  - id: \"00000000000000000003\"\n    server_port: 1985\n"
        "  - id: \"00000000000000000004\"\n    server_port: 1986\n"
        "#END\n")
    store = FileStore(path)
    fresh = [store.new_id() for _ in range(5)]
    assert not set(fresh) & {"00000000000000000003", "00000000000000000004"}


def test_an_xrpc_route_in_the_file_is_skipped_with_apisix_line(path, caplog):
    # APISIX's stream_route_checker runs xrpc.check_schema on the data plane too
    path.write_text("stream_routes:\n"
                    "  - id: 1\n    protocol:\n      name: redis\n"
                    "  - id: 2\n    server_port: 1985\n#END\n")
    with caplog.at_level(logging.ERROR, logger="gproxy.store"):
        store = FileStore(path)
    assert [r.id for r in store.list("stream_routes")] == ["2"]
    assert ('failed to check item data of [stream_routes] err:unknown protocol [redis] ,val: '
            '{"id": 1, "protocol": {"name": "redis"}}') in caplog.text


# -- the hub keeps running while the disk is slow -------------------------------------

SLOW_FSYNC = 0.3


def test_a_slow_fsync_does_not_stall_the_hub(path, monkeypatch):
    """With fsync taking 0.3 s, a greenlet ticking every 10 ms keeps ticking during
    a put (the write is off the hub, in gevent's threadpool), and put returns only
    once the journal entry and the journal's directory entry have been synced."""
    import gevent

    store = FileStore(path)
    real = {"fsync": os.fsync, "fdatasync": os.fdatasync}
    synced = []

    def slow(name):
        def sync(fd):
            if not os.readlink("/proc/self/fd/%d" % fd).startswith(str(path.parent)):
                return real[name](fd)  # another test's store, folding late
            time.sleep(SLOW_FSYNC)  # a real blocking call, as a slow disk's is
            real[name](fd)
            synced.append(time.monotonic())
        return sync

    monkeypatch.setattr(os, "fsync", slow("fsync"))
    monkeypatch.setattr(os, "fdatasync", slow("fdatasync"))
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    tick = gevent.spawn(ticker)
    try:
        gevent.sleep(0.05)
        started = time.monotonic()
        store.put("upstreams", "1", dict(UPSTREAM))
        returned = time.monotonic()
    finally:
        tick.kill()
    assert len(synced) == 2  # the new journal's directory entry, then the entry itself
    assert returned - started >= 2 * SLOW_FSYNC and synced[-1] <= returned
    during = [t for t in ticks if started <= t <= returned]
    gaps = [b - a for a, b in zip(ticks, ticks[1:]) if a >= started and b <= returned]
    # a write on the hub would leave one gap of >= 0.6 s and no tick during it
    assert len(during) >= 10, "the hub ticked %d times in %.2fs" % (len(during),
                                                                    returned - started)
    assert max(gaps) < SLOW_FSYNC / 2, "the hub stalled for %.3fs" % max(gaps)
    monkeypatch.undo()
    entries = journal.read(str(path) + ".journal")  # acknowledged means on disk
    assert [(kind, id_, value) for _, kind, id_, value in entries] == [
        ("upstreams", "1", UPSTREAM)]


# -- the journal ------------------------------------------------------------------------

def journal_path(path):
    return path.parent / (path.name + ".journal")


def test_a_write_appends_one_entry_whatever_the_store_holds(path):
    """A put costs an append of its own size: the file is not rewritten per write
    (at 700 objects that took 300 ms a write)."""
    store = FileStore(path)
    for n in range(300):
        store.put("stream_routes", str(n), {"id": str(n), "server_port": 1000 + n})
    store.fold()
    before = path.read_bytes()
    store.put("stream_routes", "x", {"id": "x", "server_port": 7})
    assert path.read_bytes() == before  # the YAML file is untouched until a fold
    assert journal_path(path).stat().st_size < 200


def test_every_truncation_of_the_journal_loads_the_complete_entries(store, path, tmp_path):
    """A crash can cut the journal anywhere: each complete entry still loads, the
    torn one is skipped, and nothing else is lost or invented."""
    for n in range(2, 5):
        store.put("stream_routes", str(n), {"id": str(n), "server_port": 1000 + n})
    raw, base = journal_path(path).read_bytes(), path.read_bytes()
    ends = [i for i in range(len(raw) + 1) if i == len(raw) or raw[i:i + 1] == b"\n"]
    for cut in range(len(raw) + 1):
        copy = tmp_path / ("cut%d" % cut)
        copy.mkdir()
        (copy / "apisix.yaml").write_bytes(base)
        (copy / "apisix.yaml.journal").write_bytes(raw[:cut])
        loaded = FileStore(copy / "apisix.yaml")
        complete = sum(1 for end in ends[1:] if end <= cut)
        assert sorted(r.id for r in loaded.list("stream_routes")) == \
            ["1"] + [str(n) for n in range(2, 2 + complete)], "cut at %d" % cut
        assert not (copy / "apisix.yaml.journal").exists()  # folded at start


def test_a_torn_entry_in_the_middle_does_not_hide_the_ones_after_it(store, path):
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    torn = journal_path(path).read_bytes()[:-5]
    store.put("stream_routes", "3", {"id": "3", "server_port": 3})
    whole = journal_path(path).read_bytes()
    journal_path(path).write_bytes(torn + whole[len(torn) + 5:])
    assert sorted(r.id for r in FileStore(path).list("stream_routes")) == ["1", "3"]


def test_a_crash_between_the_fold_and_the_journal_removal(store, path, monkeypatch):
    """The file was replaced but the journal not yet removed: the next start skips
    the entries the file already holds (a delete applied twice, or an old put
    over a newer one, would show here)."""
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    store.delete("stream_routes", "2")
    store.put("stream_routes", "2", {"id": "2", "server_port": 3})
    store.delete("stream_routes", "1")
    monkeypatch.setattr(journal.Journal, "remove", lambda self: None)  # the crash
    store.fold()
    assert journal_path(path).exists()
    monkeypatch.undo()
    again = FileStore(path)
    assert data(again) == data(store) == {
        "stream_routes": {"2": {"id": "2", "server_port": 3}}, "upstreams": {"1": UPSTREAM}}


def test_concurrent_writes_share_fsyncs(path, monkeypatch):
    """Group commit: 50 writers at once cost a handful of fsyncs, not 50, and each
    is acknowledged only once its entry is synced."""
    import gevent

    store = FileStore(path)
    syncs, real = [], os.fdatasync

    def counting(fd):
        time.sleep(0.01)
        real(fd)
        syncs.append(time.monotonic())

    monkeypatch.setattr(os, "fdatasync", counting)
    acked = {}

    def write(n):
        store.put("stream_routes", str(n), {"id": str(n), "server_port": 1000 + n})
        acked[n] = time.monotonic()

    gevent.joinall([gevent.spawn(write, n) for n in range(50)])
    assert len(acked) == 50
    assert len(syncs) <= 5, "%d fsyncs for 50 concurrent writes" % len(syncs)
    assert all(any(s <= t for s in syncs) for t in acked.values())
    monkeypatch.undo()
    assert len(FileStore(path).list("stream_routes")) == 50


def test_subscribers_hear_a_group_once_before_its_writers(path):
    import gevent

    store = FileStore(path)
    heard, answered = [], []
    store.subscribe(lambda changes: heard.append(sorted(id_ for _, id_, _ in changes)))

    def write(n):
        store.put("upstreams", str(n), {"id": str(n), "nodes": {"127.0.0.1:1": 1}})
        answered.append((n, len(heard)))

    first = gevent.spawn(write, 0)
    gevent.sleep(0)  # the first group is being synced: the next three queue behind it
    rest = [gevent.spawn(write, n) for n in (1, 2, 3)]
    gevent.joinall([first] + rest)
    assert heard == [["0"], ["1", "2", "3"]]
    assert all(seen >= (1 if n == 0 else 2) for n, seen in answered)


def test_the_journal_is_folded_after_a_quiet_second(path, monkeypatch):
    import gevent

    from gproxy.store import file as file_mod

    monkeypatch.setattr(file_mod, "FOLD_IDLE", 0.1)
    store = FileStore(path)
    store.put("stream_routes", "1", dict(ROUTE, upstream_id=None))
    assert journal_path(path).exists()
    deadline = time.monotonic() + 5
    while journal_path(path).exists() and time.monotonic() < deadline:
        gevent.sleep(0.02)
    assert not journal_path(path).exists()
    assert yaml.safe_load(path.read_text())["stream_routes"][0]["id"] == "1"


def test_a_long_journal_is_folded_as_it_grows(path, monkeypatch):
    from gproxy.store import file as file_mod

    monkeypatch.setattr(file_mod, "FOLD_MIN", 10)
    store = FileStore(path)
    for n in range(25):
        store.put("stream_routes", str(n), {"id": str(n), "server_port": 1000 + n})
        entries = len(journal.read(str(journal_path(path))))
        assert entries <= max(10, (n + 1) // 2)  # folded once it reaches that
    assert len(yaml.safe_load(path.read_text())["stream_routes"]) >= 20


def test_a_hand_edit_drops_the_changes_its_editor_could_not_see(store, path, caplog):
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})  # in the journal only
    hand_edit(path, APISIX_FILE)
    with caplog.at_level(logging.WARNING, logger="gproxy.store"):
        assert store.poll() is True
    assert "1 Admin change(s) not yet in it are dropped" in caplog.text
    assert store.get("stream_routes", "2") is None
    assert not journal_path(path).exists()
    assert FileStore(path).get("stream_routes", "2") is None


def test_a_hand_edit_in_the_files_own_layout(store, path):
    """An operator adds a line to the file as gproxy writes it (one JSON item a
    line): read line by line, without YAML, and only that route is a change."""
    calls = Calls()
    store.subscribe(calls)
    text = path.read_text()
    line = json.dumps({"id": "added", "server_port": 2000})
    hand_edit(path, text.replace("stream_routes:\n", "stream_routes:\n- %s\n" % line, 1))
    assert store.poll() is True
    assert calls.changes == [[("stream_routes", "added", {"id": "added", "server_port": 2000}),
                              ("stream_routes", None, None)]]
    assert [r.id for r in store.list("stream_routes")] == ["added", "1"]
    store.put("upstreams", "2", {"id": "2", "nodes": {"127.0.0.1:2": 1}})  # writes go on


def test_a_hand_edit_that_reorders_routes_says_so(store, path):
    store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    store.fold()
    calls = Calls()
    store.subscribe(calls)
    doc = yaml.safe_load(path.read_text())
    doc["stream_routes"].reverse()
    hand_edit(path, yaml.safe_dump(doc) + "#END\n")
    assert store.poll() is True
    assert calls.changes == [[("stream_routes", None, None)]]
    assert [r.id for r in store.list("stream_routes")] == ["2", "1"]


@pytest.mark.parametrize("value, as_yaml", [
    ({"id": "u", "nodes": {}, "desc": "caf\u00e9 \u2028 \x85 \x7f \U0001f600 \ufeff"}, True),
    ({"id": "f", "retry_timeout": 1e-05, "timeout": {"connect": 1e16, "send": 0.5,
                                                      "read": 2.0}, "nodes": {}}, True),
    ({"id": "s", "nodes": {}, "desc": "a lone \ud800 surrogate"}, False),  # no YAML form
])
def test_values_survive_the_file_byte_for_byte(path, value, as_yaml):
    """Line breaks YAML knows (U+2028, NEL), characters it refuses (DEL), numbers
    JSON writes with an exponent: all come back equal, read as JSON lines and
    as YAML (a hand edit elsewhere makes the store read YAML).  A lone surrogate
    (JSON's ``\\ud800``, which APISIX accepts) has no YAML form: JSON lines only."""
    store = FileStore(path)
    store.put("upstreams", value["id"], value)
    store.fold()
    assert FileStore(path).get("upstreams", value["id"]).value == value
    if as_yaml:
        text = path.read_text(encoding="utf-8")
        hand_edit(path, text.replace("gproxy_revision:", "other: [1, 2]\ngproxy_revision:"))
        assert FileStore(path).get("upstreams", value["id"]).value == value
