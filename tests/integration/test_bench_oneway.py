"""``python -m bench.oneway`` runs end to end (its figures are for a quiet machine: not checked).

Both gproxy variants, 20 MB once each: the relay walks (gproxy) or copies
(gproxy-copy) every byte to the sink, and the proxy closes once the sink
has read them all, or the run would hang past the timeout.
"""

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_one_direction_through_gproxy_walking_and_copying():
    run = subprocess.run([sys.executable, "-m", "bench.oneway", "--targets", "gproxy,gproxy-copy",
                          "--gb", "0.02", "--repeat", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=110)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = dict(re.findall(r"^\s+(gproxy(?:-copy)?)\s+([\d.]+) s/GB", run.stdout, re.M))
    assert set(rows) == {"gproxy", "gproxy-copy"}, run.stdout
