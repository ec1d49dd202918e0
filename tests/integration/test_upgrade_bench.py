"""``scripts/upgrade_bench.py --short``: the upgrade benchmark runs end to end (300
pinging sessions, a live upgrade, then a plain restart) and its figures hold
together.  The figures themselves are for the full run on a quiet machine
(docs/upgrade.md); here only what must hold anywhere is checked: the live
upgrade moved every session and closed none, the plain restart ended every one
and got them all back.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_upgrade_bench_short_mode(tmp_path):
    out = tmp_path / "upgrade.json"
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "upgrade_bench.py"),
                          "--short", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=220)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    live, plain = result["live_upgrade"], result["plain_restart"]
    assert result["sessions"] == live["moved"] == 300 and live["closed"] == 0
    assert live["sessions_pinged_during"] > 0
    pause = live["pause_ms"]
    assert 0 < pause["p50"] <= pause["p99"] <= pause["max"]
    memory = live["memory_kib"]
    assert memory["old_before"] > 0 and memory["new_peak"] > 0
    assert memory["both_peak"] >= max(memory["old_peak"], memory["new_peak"])
    assert plain["sessions_ended"] == 300 and plain["all_back"]
