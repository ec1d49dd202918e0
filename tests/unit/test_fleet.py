"""The fleet's parts without an etcd: the registry record and its lease, shares of a
job and their rates, a job's progress from its shares, the answers without a
fleet, and the etcd client logging in again when etcd forgot its token.

etcd is replaced by ``FakeKV`` (a dict, with a watch that calls back at once,
as the store's watch does on the hub); sessions are real ``LiveSessions`` over
a ``Registry`` with stand-in handles.
"""

import contextlib
import os
import socket

import gevent
import pytest

from gproxy import __version__
from gproxy.admin.app import create_app
from gproxy.config import Config
from gproxy.errors import ConfigError, StoreUnavailable
from gproxy.fleet import SoloFleet
from gproxy.fleet.instances import Reporter, admin_url, describe, instance_id
from gproxy.fleet.jobs import FleetJobs, aggregate
from gproxy.fleet.shares import Shares, share_path, split
from gproxy.proxy.sessions.live import LiveSessions
from gproxy.proxy.sessions.registry import Registry
from tests.unit.test_admin_api import EXT, Api, body, open_session


class FakeKV:
    """etcd as a dict: leases, puts, and a watch that calls back synchronously."""

    def __init__(self):
        self.data, self.leases, self.watchers, self.calls = {}, {}, [], []
        self._next = 0

    def put(self, path, value, lease=None):
        self.calls.append(("put", path))
        self.data[path] = (dict(value), lease)
        for prefix, callback in self.watchers:
            if path.startswith(prefix):
                callback(path, dict(value), 0)

    def items(self, path):
        return {p: v for p, (v, _) in self.data.items() if p.startswith(path)}

    def grant(self, ttl):
        self._next += 1
        self.leases[str(self._next)] = ttl
        self.calls.append(("grant", ttl))
        return str(self._next)

    def keepalive(self, lease):
        self.calls.append(("keepalive", lease))
        return self.leases.get(lease, 0)

    def revoke(self, lease):
        self.calls.append(("revoke", lease))
        self.leases.pop(lease, None)
        for path in [p for p, (_, lease_) in self.data.items() if lease_ == lease]:
            del self.data[path]

    def etcd_version(self):
        return "3.4.0"

    def new_id(self):
        self._next += 1
        return "%020d" % self._next

    def watch(self, path, callback):
        self.watchers.append((path, callback))


# -- the registry record ----------------------------------------------------------------

def test_the_record_has_apisix_fields_and_its_lease_is_renewed_not_rewritten():
    kv = FakeKV()
    stats = {"live_sessions": 2, "per_node": {"10.0.0.5:1883": 2}}
    rep = Reporter(kv, "gp-a", "http://127.0.0.1:9080", 30, lambda: dict(stats))
    rep.report()
    value, lease = kv.data["/data_plane/server_info/gp-a"]
    assert kv.leases[lease] == 30
    assert {k: value[k] for k in ("id", "version", "etcd_version")} == {
        "id": "gp-a", "version": __version__, "etcd_version": "3.4.0"}
    assert value["hostname"] == socket.gethostname() and isinstance(value["boot_time"], int)
    assert value["gproxy"]["admin"] == "http://127.0.0.1:9080"
    assert (value["gproxy"]["live_sessions"], value["gproxy"]["per_node"]) == (2, stats["per_node"])
    assert value["gproxy"]["draining"] is False and value["gproxy"]["pid"] == os.getpid()
    kv.calls.clear()
    rep.report()  # nothing changed: the lease is renewed, the record not rewritten
    assert kv.calls == [("keepalive", lease)]
    stats["live_sessions"] = 3
    rep.report()
    assert ("put", "/data_plane/server_info/gp-a") in kv.calls
    # etcd lost the lease (it was down longer than the TTL): a new one, the record again
    kv.leases.clear()
    kv.calls.clear()
    rep.report()
    assert [c[0] for c in kv.calls] == ["keepalive", "grant", "put"]
    rep.set_draining()
    assert kv.data["/data_plane/server_info/gp-a"][0]["gproxy"]["draining"] is True
    rep.stop()
    assert "/data_plane/server_info/gp-a" not in kv.data


def test_describe_lists_apisix_records_too():
    record = {"id": "apisix-1", "hostname": "h", "version": "3.9.0", "boot_time": 1,
              "etcd_version": "3.5.0"}
    assert describe("/data_plane/server_info/apisix-1", record)["product"] == "apisix"
    item = describe("/data_plane/server_info/x", {"gproxy": {"admin": "http://a:1",
                                                             "live_sessions": 4}})
    assert (item["id"], item["product"], item["admin"], item["live_sessions"]) == (
        "x", "gproxy", "http://a:1", 4)


def test_instance_id_is_apisix_id_or_kept_in_apisix_uid(tmp_path, caplog):
    assert instance_id("my-node", str(tmp_path)) == "my-node"
    made = instance_id(None, str(tmp_path))
    assert (tmp_path / "apisix.uid").read_text() == made
    assert instance_id(None, str(tmp_path)) == made  # kept across restarts
    assert instance_id(None, None) != instance_id(None, None)  # no config file: per run
    assert instance_id(None, str(tmp_path / "missing" / "dir"))
    assert "cannot keep the instance id" in caplog.text


def test_admin_url_from_admin_listen():
    def url(**admin):
        return admin_url(Config({"deployment": {"admin": admin}}))
    assert url() == "http://127.0.0.1:9080"
    assert url(admin_listen={"ip": "::1", "port": 9180}) == "http://[::1]:9180"
    assert url(admin_listen={"ip": "0.0.0.0", "port": 9180},
               admin_key=[{"name": "a", "key": "k" * 32, "role": "admin"}]) == \
        "http://%s:9180" % socket.gethostname()
    cfg = Config({"gproxy": {"fleet": {"admin_url": "https://gp-3.example:9180/"}}})
    assert admin_url(cfg) == "https://gp-3.example:9180"


def test_report_ttl_has_apisix_bounds():
    assert Config()["plugin_attr.server-info.report_ttl"] == 60
    for bad in (2, 86401, "60"):
        with pytest.raises(ConfigError, match="plugin_attr.server-info.report_ttl"):
            Config({"plugin_attr": {"server-info": {"report_ttl": bad}}})


# -- a job's progress ---------------------------------------------------------------------

JOB = {"id": "00000000000000000007", "rate": 90, "selector": {"node": "n:1"},
       "started_at": 1000.0, "state": "running", "started_by": "a",
       "instances": ["a", "b", "c"]}


def share(total, done=0, gone=0, failed=0, state="running", rate=30.0, finished_at=None):
    return {"total": total, "done": done, "gone": gone, "failed": failed, "state": state,
            "rate": rate, "finished_at": finished_at}


def test_progress_is_the_sum_of_the_shares():
    got = aggregate(JOB, {"a": share(30, 10), "b": share(20, 5, gone=1),
                          "c": share(10, 10, state="done", finished_at=1001.0)},
                    {"a", "b", "c"}, now=1002.0)
    assert (got["state"], got["total"], got["done"], got["gone"], got["failed"],
            got["remaining"]) == ("running", 60, 25, 1, 0, 34)
    assert got["fleet"] and got["started_by"] == "a" and got["finished_at"] is None
    assert [(i["instance"], i["state"]) for i in got["instances"]] == [
        ("a", "running"), ("b", "running"), ("c", "done")]


def test_an_instance_that_died_mid_job_is_lost_and_the_job_finishes():
    shares = {"a": share(30, 12), "b": share(20, 20, state="done", finished_at=1005.0)}
    got = aggregate(JOB, shares, {"b"}, now=1010.0)  # a left the registry (killed)
    assert got["state"] == "done"
    assert (got["done"], got["failed"], got["remaining"]) == (32, 18, 0)
    assert got["instances"][0]["state"] == "lost"
    assert got["finished_at"] == 1005.0


def test_a_stopped_share_and_a_cancelled_job():
    shares = {"a": share(30, 12, gone=18, state="stopped", finished_at=1003.0),
              "b": share(20, 20, state="done", finished_at=1006.0)}
    assert aggregate(JOB, shares, {"b"}, now=1010.0)["state"] == "done"
    got = aggregate(dict(JOB, state="cancelled"), {"a": share(30, 3)}, {"a"}, now=1001.0)
    assert got["state"] == "cancelled"


def test_a_named_instance_is_waited_for_only_briefly():
    assert aggregate(JOB, {"a": share(5, 5, state="done", finished_at=1000.5)},
                     {"a", "b"}, now=1000.6)["state"] == "running"
    assert aggregate(JOB, {"a": share(5, 5, state="done", finished_at=1000.5)},
                     {"a", "b"}, now=1003.0)["state"] == "done"


def test_paths_of_jobs_and_shares():
    assert split("/gproxy/evictions/00000000000000000007") == ("00000000000000000007", None)
    assert split(share_path("7", "gp-a")) == ("7", "gp-a")
    assert split("/gproxy/evictions/7/other/x") is None


# -- shares -------------------------------------------------------------------------------

class Sessions(LiveSessions):
    """Real query and evictions; ending a session closes it in the registry."""

    def end_many(self, ids, *args, **kwargs):
        ended = 0
        for sid in ids:
            info = self.registry.get(sid)
            if info is not None:
                self.registry.remove(info)
                ended += 1
        return {"ended": ended, "failed": 0}


def test_each_instance_takes_its_part_of_the_rate():
    kv = FakeKV()
    registry = Registry()
    sessions = Sessions(registry)
    with contextlib.ExitStack() as stack:
        for i in range(30):
            open_session(stack, registry, "1", node="10.0.0.5:1883" if i < 20 else "10.0.0.6:1")
        mine = Shares(kv, "a", lambda: sessions)
        kv.watch("/gproxy/evictions/", mine.on_change)
        jobs = FleetJobs(kv, mine, lambda: ["a", "b"])
        # b holds 60 sessions of that node: it says so as soon as it sees the job
        other = share(60, rate=60.0)
        kv.watchers.append(("/gproxy/evictions/", lambda path, value, rev: (
            split(path)[1] is None and not value.get("state") == "cancelled"
            and kv.put(share_path(split(path)[0], "b"), dict(other, instance="b"),
                       value["lease"]))))
        job = jobs.start({"node": "10.0.0.5:1883"}, 80.0)
        shares = {s["instance"]: s for s in job["instances"]}
        assert shares["a"]["total"] == 20 and shares["a"]["rate"] == pytest.approx(20.0)
        assert job["total"] == 80
        for _ in range(300):
            if not mine.running and kv.items(share_path(job["id"], "a"))[
                    share_path(job["id"], "a")]["state"] == "done":
                break
            gevent.sleep(0.01)
        done = kv.items(share_path(job["id"], "a"))[share_path(job["id"], "a")]
        assert (done["state"], done["done"], done["total"]) == ("done", 20, 20)
        assert len(registry) == 10


# -- without a fleet ---------------------------------------------------------------------

def test_fleet_requests_without_etcd_answer_for_this_instance_with_a_note(tmp_path):
    api = Api(tmp_path)
    note = "fleet=true needs the etcd store: this instance only"
    api.app = create_app(api.store, api.sessions, Config(),
                         fleet=SoloFleet(lambda: api.sessions, note))
    api.client = api.app.test_client()
    with contextlib.ExitStack() as stack:
        open_session(stack, api.registry, "1", client_id="dev-1", node="10.0.0.5:1883")
        got = body(api.get(EXT + "/sessions?fleet=true&client_id=dev"))
        assert (got["total"], got["note"]) == (1, note)
        got = body(api.get(EXT + "/instances"))
        assert (got["total"], got["per_node"], got["note"]) == (
            1, {"10.0.0.5:1883": 1}, note)
        resp = api.delete(EXT + "/sessions?node=10.0.0.5:1883&fleet=true")
        assert resp.status_code == 200 and body(resp)["note"] == note
        assert body(resp)["total"] == 1


def test_an_app_without_a_fleet_says_so(tmp_path):
    api = Api(tmp_path)
    got = body(api.get(EXT + "/sessions?fleet=true"))
    assert got["note"].startswith("no fleet here")
    assert body(api.get(EXT + "/instances"))["note"].startswith("no fleet here")


# -- the etcd client and auth ---------------------------------------------------------------

def test_a_forgotten_token_means_one_login_and_one_retry(monkeypatch):
    from etcd3gw import exceptions as etcd_exc
    from gproxy.store.etcdclient import Cluster
    from gproxy.store.etcdconn import EtcdAccess
    access = EtcdAccess(user="u", password="p")
    logins = []

    def login(endpoint, timeout, starting):
        logins.append(starting)
        access.token = "token-%d" % len(logins)
        access._token_until = float("inf")
    monkeypatch.setattr(access, "_login", login)
    cluster = Cluster(["http://127.0.0.1:1"], 1, 10, access)
    answers = [etcd_exc.Etcd3Exception('{"error":"etcdserver: invalid auth token"}'),
               {"header": {"revision": "5"}}]
    sent = []

    def post(url, json=None, headers=None):
        sent.append(headers["Authorization"])
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(cluster.endpoints[0].client, "post", post)
    assert cluster.call("/kv/range", {})["header"]["revision"] == "5"
    assert sent == ["token-1", "token-2"] and logins == [True, True]
    answers.append(etcd_exc.Etcd3Exception('{"error":"etcdserver: permission denied"}'))
    with pytest.raises(StoreUnavailable, match="^etcdserver: permission denied$"):
        cluster.call("/kv/put", {})


def test_pages_of_several_sources_merge_into_one():
    from gproxy.proxy.sessions.live import merge_pages

    def source(*items, per_node=None):
        listed = [{"id": i, "client_id": c, "connected_at": t} for i, c, t in items]
        return {"total": len(listed) + 1, "list": listed, "per_node": per_node}
    a = source(("a1", "x", 1.0), ("a2", "m", 3.0), ("a3", "b", 5.0), per_node={"n:1": 2})
    b = source(("b1", "y", 2.0), ("b2", "m", 3.0), per_node={"n:1": 1, "n:2": 4})
    c = source(("c1", "z", 4.0))
    got = merge_pages([a, b, c], {"sort": "connected_at", "offset": 1, "limit": 3},
                      pause=lambda: None)
    assert [i["id"] for i in got["list"]] == ["b1", "a2", "b2"]  # ties in source order
    assert got["total"] == 9 and "per_node" not in got
    got = merge_pages([a, b, c], {"sort": "-client_id", "offset": 0, "limit": 10,
                                  "misplaced": True}, pause=lambda: None)
    assert [i["client_id"] for i in got["list"]] == ["z", "y", "x", "m", "m", "b"]
    assert got["per_node"] == {"n:1": 3, "n:2": 4}
    pauses = []
    many = {"total": 600, "list": [{"id": str(n), "connected_at": n} for n in range(600)]}
    got = merge_pages([many], {"offset": 500, "limit": 50}, pause=lambda: pauses.append(1))
    assert [i["id"] for i in got["list"]] == [str(n) for n in range(500, 550)]
    assert len(pauses) == 550 // 128  # the data path gets the hub back as it goes


class DownKV(FakeKV):
    def items(self, path):
        raise StoreUnavailable("http://127.0.0.1:2379: connection refused")


def test_an_unreadable_registry_answers_for_this_instance_with_the_reason(tmp_path):
    from gproxy.fleet import Fleet

    class Store:  # what Fleet takes of the etcd store
        cluster, prefix = None, "/apisix"

        def watch_keys(self, path, callback):
            pass
    registry = Registry()
    sessions = LiveSessions(registry)
    fleet = Fleet(Store(), Config({"apisix": {"id": "gp-a"}}), lambda: sessions)
    fleet.kv = DownKV()
    with contextlib.ExitStack() as stack:
        open_session(stack, registry, "1", client_id="dev-1", node="10.0.0.5:1883")
        got = fleet.query({"sort": "connected_at", "offset": 0, "limit": 10}, "key")
        assert got["total"] == 1 and "connection refused" in got["note"]
        got = fleet.instances("key")
        assert got["per_node"] == {"10.0.0.5:1883": 1} and "connection refused" in got["note"]
    fleet.leave()


# -- a live upgrade: the same instance in a new process ---------------------------------------

def test_a_live_upgrade_keeps_the_registration_its_lease_and_boot_time():
    """The old process hands its lease over at the commit and never says draining nor
    revokes; the new one renews that lease and writes its pid: the key never goes."""
    kv = FakeKV()
    stats = lambda: {"live_sessions": 5, "per_node": {}}  # noqa: E731
    old = Reporter(kv, "gp-a", "http://127.0.0.1:9080", 30, stats)
    old.boot_time = 1000  # started long ago
    old.report()
    lease = kv.data["/data_plane/server_info/gp-a"][1]
    new = Reporter(kv, "gp-a", "http://127.0.0.1:9080", 30, stats)
    new.set_draining()  # a new process that never took over (its handover failed)
    assert not [c for c in kv.calls if c[0] in ("put", "revoke")][1:]
    kv.calls.clear()
    carried = old.hand_over()
    assert carried == {"lease": lease, "boot_time": 1000}
    old.set_draining()  # the old process drains what could not move, then exits
    old.stop()
    assert kv.calls == []  # no draining record, no revoke: the key stays
    new.lease, new.boot_time = carried["lease"], carried["boot_time"]  # take_over, less
    new.report()                                                       # its renewal loop
    assert [c[0] for c in kv.calls] == ["keepalive", "put"]  # the same lease, no grant
    value, on = kv.data["/data_plane/server_info/gp-a"]
    assert on == lease and value["boot_time"] == 1000 and value["gproxy"]["draining"] is False


def test_a_running_share_moves_to_the_new_process_and_finishes_there():
    """A share held mid-way (the old process's sessions frozen for the handover) goes
    on in the new process under the same instance id, from where it stopped."""
    kv = FakeKV()
    old_registry, new_registry = Registry(), Registry()
    old_sessions, new_sessions = Sessions(old_registry), Sessions(new_registry)
    with contextlib.ExitStack() as stack:
        for _ in range(6):
            open_session(stack, old_registry, "1", node="10.0.0.5:1883")
        old = Shares(kv, "a", lambda: old_sessions)
        kv.watch("/gproxy/evictions/", old.on_change)
        new = Shares(kv, "a", lambda: new_sessions)
        new.standby = True  # until the commit
        kv.watch("/gproxy/evictions/", new.on_change)
        jobs = FleetJobs(kv, old, lambda: ["a"])
        job = jobs.start({"node": "10.0.0.5:1883"}, 10.0)  # 6 sessions at 10/s
        assert not new.running  # the new process took no share of its own
        gevent.sleep(0.25)
        old_sessions.evictions.hold()  # the freeze
        ended = 6 - len(old_registry)
        assert 1 <= ended < 6
        for info in list(old_registry.query()[1]):  # the sessions move
            old_registry.remove(info, moved=True)
            new_registry.adopt(info, None)
        carried = old.hand_over()
        old_sessions.evictions.hand_over()
        new.take_over(carried)
        for _ in range(300):
            value = kv.items(share_path(job["id"], "a"))[share_path(job["id"], "a")]
            if value["state"] == "done":
                break
            gevent.sleep(0.01)
        assert (value["state"], value["done"], value["gone"], value["total"]) == (
            "done", 6, 0, 6)
        assert len(new_registry) == 0  # the rest were ended here
        old.stop()  # the old process's shutdown writes nothing over it
        assert kv.items(share_path(job["id"], "a"))[share_path(job["id"], "a")][
            "state"] == "done"
