"""The list endpoints' filters (gproxy.admin.filters): RE2 for ``?name=``.

The regex denial of service the review found: ``(a+)+$`` against a long run
of ``a`` ending in ``!`` backtracks 2^n times in Python's ``re`` (hours for
50 000 characters); RE2 is linear.  Flask's test client and the Admin API
tests (test_admin_api.py) cover the HTTP side; these tests the matcher.
"""

import time

import gevent
import pytest
from werkzeug.datastructures import MultiDict

from gproxy.admin import filters
from gproxy.admin.filters import FilterError, ListFilter, compile_name
from gproxy.store.base import Record


def record(value, id_="1"):
    return Record("upstreams", id_, value, 1, 1)


def test_catastrophic_pattern_runs_in_linear_time():
    name = "a" * 50_000 + "!"
    keep = ListFilter(MultiDict({"name": "(a+)+$"}))
    started = time.monotonic()
    assert keep.keep({"name": name}) is False
    assert keep.keep({"name": "a" * 50_000}) is True
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("pattern", ["(", "a{2,1}", r"\1", "(?=a)", "(?P<n>a)(?P=n)",
                                     "x" * (filters.MAX_PATTERN + 1)])
def test_what_re2_cannot_compile_is_a_filter_error(pattern):
    with pytest.raises(FilterError) as info:
        compile_name(pattern)
    assert str(info.value).startswith("invalid name filter: ")
    assert len(str(info.value)) < 200 + len(pattern)


def test_a_pattern_too_large_for_its_memory_budget_is_refused():
    # counted repetition expands: 1000 copies of the class of all letters
    with pytest.raises(FilterError, match="^invalid name filter: pattern too large"):
        compile_name(r"\pL{1000}")


@pytest.mark.parametrize("pattern, name, hit", [
    ("mqtt", "my-mqtt-route", True),
    ("^mqtt", "my-mqtt-route", False),
    ("route$", "my-mqtt-route", True),
    ("(?i)MQTT", "mqtt", True),
    ("é", "café", True),
    ("^.{4}$", "café", True),  # characters, not bytes
    (r"\d+", "r12", True),
])
def test_search_semantics_like_re(pattern, name, hit):
    assert bool(compile_name(pattern).search(name)) is hit


def test_label_and_id_filters():
    value = {"name": "a", "labels": {"env": "prod"}, "upstream_id": 7}
    assert ListFilter(MultiDict({"label": "env"})).keep(value)
    assert ListFilter(MultiDict({"label": "env:prod"})).keep(value)
    assert not ListFilter(MultiDict({"label": "env:dev"})).keep(value)
    assert ListFilter(MultiDict({"upstream_id": "7"})).keep(value)
    assert ListFilter(MultiDict({"filter": "upstream_id=7"})).keep(value)
    assert not ListFilter(MultiDict({"filter": "upstream_id=8"})).keep(value)


def test_a_long_listing_yields_to_the_hub(monkeypatch):
    yields = []
    monkeypatch.setattr(filters, "YIELD_AFTER", 0.0)
    monkeypatch.setattr(gevent, "sleep", lambda s=0: yields.append(s))
    records = [record({"name": "r%d" % i}, str(i)) for i in range(50)]
    kept = ListFilter(MultiDict({"name": "^r[0-9]$"})).apply(records)
    assert [r.id for r in kept] == [str(i) for i in range(10)]
    assert len(yields) == 50

