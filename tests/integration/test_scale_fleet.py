"""``scripts/scale.py --fleet --short``: the fleet run end to end (3,000 idle sessions over
2 workers, 2 brokers, 2 client processes from 2 source addresses) and its figures hold
together.  The 50,000-session figures are the full run's, by hand (docs/sessions.md);
on a shared machine only their consistency is checked here.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fleet_short_mode(tmp_path):
    out = tmp_path / "fleet.json"
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "scale.py"), "--fleet",
                          "--short", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=230)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sessions"] == 3000 and result["opened"]["errors"] == 0
    assert len(result["rss_kib"]["workers"]) == 2  # both workers, each with its own probe
    assert result["api"]["total"] == result["api"]["live_sessions"] == 3000
    for phase in result["phases"].values():
        assert phase["n"] >= 100 and 0 < phase["p50"] <= phase["p99"] <= phase["max"]
        assert len(phase["workers"]) == 2
    assert "idle sessions over 2 workers" in run.stdout
