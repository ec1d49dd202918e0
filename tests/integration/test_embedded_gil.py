"""A host whose threads compute does not slow an embedded gproxy in process mode.

The measurement is the benchmark's (``bench.embedload``, shortened): a host program
embeds gproxy and runs two CPU-bound Python threads; a separate client process
alternates PINGREQs straight to mosquitto and through the proxy every 2 ms, so
both paths see the same machine at the same moment.  The target (issue 28) is
p99 through the proxy within 1 ms of direct.  This machine may be shared, so the
allowance grows with the noise the direct pings themselves show in the same run,
and the p99 may take up to three runs: other processes' load is random, a wait
for the host's GIL is not (it would show in every run, and in the p50, which
every run must keep within 1 ms of direct: the GIL's switch interval is 5 ms).
The thread mode, measured the same way, shows the load is real (every relayed
packet waits for the GIL there).
"""

import pytest

from bench.embedload import measure

pytestmark = pytest.mark.integration
INTERVAL = 0.002
RUNS = 3


def within_target(run):
    """p99 through the proxy within 1 ms of direct, plus twice the direct pings' own
    spread in the same run (p99 - p50: ~0.3 ms on a quiet machine)."""
    direct, proxied = run["direct"], run["proxy"]
    return proxied["p99_ms"] - direct["p99_ms"] < 1.0 + 2 * (direct["p99_ms"] - direct["p50_ms"])


def test_a_computing_host_does_not_slow_the_process_mode(mosquitto, tmp_path):
    broker = mosquitto()
    thread = measure(str(tmp_path), broker.port, "thread", 2, 2.0, INTERVAL)
    runs = []
    while len(runs) < RUNS and not any(within_target(r) for r in runs):
        runs.append(measure(str(tmp_path), broker.port, "process", 2, 4.0, INTERVAL))
    figures = {"thread": thread, "process": runs}
    # the load is real: through the thread mode, the GIL makes every packet wait
    assert thread["proxy"]["p50_ms"] > 2.0, figures
    for run in runs:  # never a wait for the GIL, in any run
        assert run["proxy"]["p50_ms"] - run["direct"]["p50_ms"] < 1.0, figures
        assert thread["proxy"]["p50_ms"] > 10 * run["proxy"]["p50_ms"], figures
        assert run["left_behind"] == [], figures  # the host's stop took its proxy along
    assert within_target(runs[-1]), figures
    assert runs[-1]["proxy"]["p99_ms"] < thread["proxy"]["p99_ms"], figures
    assert thread["left_behind"] == []
