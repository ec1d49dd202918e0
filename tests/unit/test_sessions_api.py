"""``/apisix/admin/gproxy/sessions`` paging, filters and evictions over the Admin API.

Paging takes APISIX's ``page``/``page_size`` with the same bounds and
plain-text 400 (docs/apisix-behaviour.md §6); a bad filter or rate is a 400
JSON error that changes nothing.
"""

import contextlib

import pytest

from tests.unit.test_admin_api import EXT, Api, body, open_session, wait_job


@pytest.fixture
def api(tmp_path):
    return Api(tmp_path)


def test_pages_span_every_match_in_order(api):
    with contextlib.ExitStack() as stack:
        infos = [open_session(stack, api.registry, "1", client_id="dev-%02d" % i,
                              bytes_in=i % 4)[0] for i in range(25)]
        got = body(api.get(EXT + "/sessions?page=2&page_size=10"))
        assert (got["total"], got["page"], got["page_size"]) == (25, 2, 10)
        assert [s["id"] for s in got["list"]] == [i.id for i in infos[10:20]]
        got = body(api.get(EXT + "/sessions?page=3&page_size=10&sort=-client_id"))
        assert [s["client_id"] for s in got["list"]] == ["dev-04", "dev-03", "dev-02",
                                                         "dev-01", "dev-00"]
        got = body(api.get(EXT + "/sessions?page=9&page_size=10"))
        assert got["list"] == [] and got["total"] == 25
        seen = []
        for page in (1, 2, 3):  # equal bytes_in: pages never overlap
            got = body(api.get(EXT + "/sessions?page=%d&page_size=10&sort=bytes_in" % page))
            seen += [s["id"] for s in got["list"]]
        assert sorted(seen) == sorted(i.id for i in infos)
        got = body(api.get(EXT + "/sessions?client_id=dev-1&state=relaying&page_size=10"))
        assert got["total"] == 0  # open_session leaves them in preread
        got = body(api.get(EXT + "/sessions?client_id=dev-1&state=preread&page_size=10"))
        assert got["total"] == 10


@pytest.mark.parametrize("size", ["9", "501", "0"])
def test_page_size_bounds_answer_in_plain_text(api, size):
    resp = api.get(EXT + "/sessions?page=1&page_size=" + size)
    assert resp.status_code == 400
    assert resp.mimetype == "text/plain"
    assert resp.get_data(as_text=True) == "page_size must be between 10 and 500"


@pytest.mark.parametrize("query,msg", [
    ("sort=node", "invalid sort: node"),
    ("state=open", "invalid state: open, expect one of preread, connecting, relaying, closing"),
    ("client_addr=nope", "invalid client_addr: nope"),
])
def test_bad_filters_are_400_json(api, query, msg):
    resp = api.get(EXT + "/sessions?" + query)
    assert resp.status_code == 400 and body(resp) == {"error_msg": msg}


@pytest.mark.parametrize("query", ["rate=0", "rate=-3", "rate=fast", "rate=inf"])
def test_a_bad_rate_evicts_nothing(api, query):
    with contextlib.ExitStack() as stack:
        _, closer = open_session(stack, api.registry, "1")
        resp = api.delete(EXT + "/sessions?all=true&" + query)
        assert resp.status_code == 400
        assert body(resp)["error_msg"].startswith("invalid rate: ")
        assert api.sessions.evictions.jobs == {} and closer.ends == []


def test_evict_by_ids_follow_and_cancel(api):
    with contextlib.ExitStack() as stack:
        a, close_a = open_session(stack, api.registry, "1")
        b, close_b = open_session(stack, api.registry, "1")
        job = body(api.delete(EXT + "/sessions?ids=%s,nope-1" % a.id))
        assert job["total"] == 1  # only live sessions are picked
        job = wait_job(api, job["id"])
        assert (job["state"], job["done"], job["remaining"]) == ("done", 1, 0)
        assert close_a.ends and not close_b.ends
        listed = body(api.get(EXT + "/evictions"))
        assert listed["total"] == 1 and listed["list"][0]["id"] == job["id"]
        slow = body(api.delete(EXT + "/sessions?route_id=1&rate=0.5"))
        assert slow["rate"] == 0.5
        cancelled = body(api.delete(EXT + "/evictions/" + slow["id"]))
        assert cancelled["state"] == "cancelled"
        assert api.get(EXT + "/evictions/999").status_code == 404
        assert body(api.delete(EXT + "/evictions/999")) == {"message": "Key not found"}


def test_evictions_need_an_admin_key(api):
    with contextlib.ExitStack() as stack:
        _, closer = open_session(stack, api.registry, "1")
        assert api.delete(EXT + "/sessions?all=true&rate=5", headers={}).status_code == 401
        assert api.get(EXT + "/evictions", headers={}).status_code == 401
        assert closer.ends == []
