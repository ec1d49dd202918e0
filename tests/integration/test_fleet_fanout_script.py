"""``scripts/fleet_fanout.py --short``: the fan-out measurement runs end to end
(etcd, two brokers, three instances with 300 sessions each) and its figures
hold together.  The figures themselves are for the full run on a quiet
machine (docs/fleet.md); on a shared CI machine only loose bounds are checked.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.integration.etcd import needs_etcd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180), needs_etcd]


def test_fanout_script_short_mode(tmp_path):
    out = tmp_path / "fanout.json"
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fleet_fanout.py"),
                          "--short", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["instances"], result["sessions_each"]) == (3, 300)
    views = result["views"]
    assert set(views) >= {"this instance, page of 50", "fleet, page of 50",
                          "fleet, one client id", "instances (stats of each)"}
    for name, view in views.items():
        assert 0 < view["median_ms"] <= view["max_ms"] < 5000, (name, view)
    # a fleet page is a page: the same size as one instance's, not three
    assert views["fleet, page of 50"]["bytes"] < 2 * views["this instance, page of 50"]["bytes"]
    assert set(result["hub_holds"]) == {"gp0", "gp1", "gp2"}
