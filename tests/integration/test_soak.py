"""The soak and fault test's short mode (``python -m tests.soak --short``), in CI.

The long mode is run by hand (docs/operations.md); both check the same things.
"""

import pytest

from tests import soak

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def test_short_soak():
    report = soak.run(duration=20.0, workers=6, samples=2)
    summary = {k: v for k, v in report.items() if k not in ("events", "health_marks")}
    assert report["exit_code"] == 0, summary
    assert report["tracebacks"] == 0, summary
    assert report["wills_published"] == 0, summary  # no false "device offline"
    assert report["qos1_lost"] == 0, summary
    assert report["sessions_served"] >= 50, summary
    # the SYN-dropping node is marked down before the churn starts: no dial reaches it
    syn = [node for node in report["dial_failures_after_marked_down"]]
    assert syn, summary
    with_checks = report["reconnect_s_syn_dropping_node"]["with_checks"]
    without = report["reconnect_s_syn_dropping_node"]["without_checks"]
    assert all(t is not None and t < 1.0 for t in with_checks), summary
    assert all(t is not None and t >= 1.4 for t in without), summary
    assert report["fds_end"] <= report["fds_start"] + 20, summary
