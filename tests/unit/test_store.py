"""gproxy.store.FileStore against docs/apisix-behaviour.md §7 (standalone YAML).

The file is read back with PyYAML and by a second FileStore, never compared with
gproxy's own renderer.  Hand edits are written the way an operator would (plain
open/write) with the mtime pushed forward so a coarse clock cannot hide them.
"""

import logging
import os
import re
import time

import pytest
import yaml

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
    s = FileStore(path)
    s.put("upstreams", "1", dict(UPSTREAM))
    s.put("stream_routes", "1", dict(ROUTE))
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

    def __call__(self):
        self.count += 1


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
    text = path.read_text()
    assert text.endswith("#END\n")
    assert "#END" in text[-10:] and text.rstrip().endswith("#END")  # APISIX's end flag rule
    doc = yaml.safe_load(text)
    assert isinstance(doc["stream_routes"], list) and isinstance(doc["upstreams"], list)
    assert doc["stream_routes"] == [ROUTE, ROUTE2]
    assert doc["upstreams"] == [UPSTREAM]


def test_deleting_everything_keeps_a_valid_file(store, path):
    store.delete("stream_routes", "1")
    store.delete("upstreams", "1")
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
    assert os.listdir(path.parent) == [path.name]


def test_failed_write_changes_nothing(store, path, monkeypatch):
    calls = Calls()
    store.subscribe(calls)
    raw, before = path.read_bytes(), data(store)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put("stream_routes", "2", {"id": "2", "server_port": 2})
    with pytest.raises(OSError):
        store.put("stream_routes", "1", dict(ROUTE, server_port=9))
    with pytest.raises(OSError):
        store.delete("stream_routes", "1")
    assert path.read_bytes() == raw
    assert data(store) == before
    assert calls.count == 0
    assert os.listdir(path.parent) == [path.name]
    monkeypatch.undo()
    assert data(FileStore(path)) == before


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
    assert store.poll() is False
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
    once the data and the directory entry have been fsynced."""
    import gevent

    store = FileStore(path)
    real_fsync = os.fsync
    synced = []

    def slow_fsync(fd):
        time.sleep(SLOW_FSYNC)  # a real blocking call, as a slow disk's is
        real_fsync(fd)
        synced.append(time.monotonic())

    monkeypatch.setattr(os, "fsync", slow_fsync)
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
    assert len(synced) == 2  # the temp file, then the directory after the rename
    assert returned - started >= 2 * SLOW_FSYNC and synced[-1] <= returned
    during = [t for t in ticks if started <= t <= returned]
    gaps = [b - a for a, b in zip(ticks, ticks[1:]) if a >= started and b <= returned]
    # a write on the hub would leave one gap of >= 0.6 s and no tick during it
    assert len(during) >= 10, "the hub ticked %d times in %.2fs" % (len(during),
                                                                    returned - started)
    assert max(gaps) < SLOW_FSYNC / 2, "the hub stalled for %.3fs" % max(gaps)
    with open(path, encoding="utf-8") as fh:  # acknowledged means on disk
        on_disk = yaml.safe_load(fh)
    assert on_disk["upstreams"] == [UPSTREAM]
