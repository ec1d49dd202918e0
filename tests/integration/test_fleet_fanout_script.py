"""``scripts/fleet_fanout.py --short``: the fan-out measurement runs end to end
(etcd, two brokers, three instances with 300 sessions each) and its figures
hold together.  The figures themselves are for the full run on a quiet
machine (docs/fleet.md); on a shared CI machine only loose bounds are checked.
"""

import pytest

from tests.integration.etcd import needs_etcd
from tests.integration.helpers import run_short

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180), needs_etcd]


def test_fanout_script_short_mode(tmp_path):
    result = run_short("fleet_fanout.py", tmp_path, timeout=170)
    assert (result["instances"], result["sessions_each"]) == (3, 300)
    views = result["views"]
    assert set(views) >= {"this instance, page of 50", "fleet, page of 50",
                          "fleet, one client id", "instances (stats of each)"}
    for name, view in views.items():
        assert 0 < view["median_ms"] <= view["max_ms"] < 5000, (name, view)
    # a fleet page is a page: the same size as one instance's, not three
    assert views["fleet, page of 50"]["bytes"] < 2 * views["this instance, page of 50"]["bytes"]
    assert set(result["hub_holds"]) == {"gp0", "gp1", "gp2"}
