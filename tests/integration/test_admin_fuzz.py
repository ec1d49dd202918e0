"""The Admin API fuzzed from its own OpenAPI document, against a live gproxy.

schemathesis reads ``GET /apisix/admin/gproxy/openapi.json`` from the running
gproxy and sends what the document allows and what it does not (boundary
values, wrong types, missing fields, stateful create-read-delete chains),
a bounded number of cases with a fixed seed, and checks every answer against
the document: no 5xx, only documented status codes, content types, headers
and bodies, 401 without a key, 404 after a delete.  The gproxy under test
runs with the hub probe (``gproxy.hubprobe``): no request may hold the hub
on a CPU for longer than the budget, and the log may hold no traceback.

    GPROXY_FUZZ_EXAMPLES=100 GPROXY_FUZZ_SECONDS=1200 GPROXY_FUZZ_SEED=$RANDOM \\
        .venv/bin/python -m pytest tests/integration/test_admin_fuzz.py     # a longer run
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from gproxy import hubprobe
from tests.integration.conftest import HOST
from tests.needs import require

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KEY = "edd1c9f034335f136f87ad84b625c8f1"
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "ignored_auth",
          "use_after_free", "ensure_resource_availability", "unsupported_method",
          "allow_header_conformance")
EXAMPLES = os.environ.get("GPROXY_FUZZ_EXAMPLES", "6")
SEED = os.environ.get("GPROXY_FUZZ_SEED", "23")
#: each phase's cap in seconds (coverage, fuzzing, stateful)
SECONDS = int(os.environ.get("GPROXY_FUZZ_SECONDS", "20"))
#: the longest the hub may be held on a CPU while fuzzed (the target is a few ms; the
#: margin covers garbage collections and a machine shared with other work)
HOLD_BUDGET_MS = float(os.environ.get("GPROXY_FUZZ_HOLD_BUDGET_MS", "50"))


def schemathesis():
    found = shutil.which("st", path=os.path.dirname(sys.executable))
    require(found is not None, "the Admin API fuzzing needs schemathesis (bash scripts/venv.sh "
            "test installs it)")
    return found


@pytest.fixture
def fast_store():
    """A directory for the store on tmpfs when there is one: fuzzing writes
    thousands of times, and what it checks is not the disk's fsync."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="gproxy-fuzz-", dir=base)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_phase(st, gp, phase, workdir):
    url = "http://%s:%d" % (HOST, gp.admin_port)
    command = [st, "run", url + "/apisix/admin/gproxy/openapi.json", "--url", url,
               "-H", "X-API-KEY: " + KEY, "--checks", ",".join(CHECKS), "--phases", phase,
               "--max-examples", EXAMPLES, "--seed", SEED, "--max-time", str(SECONDS),
               "--workers", "1", "--request-timeout", "20", "--no-color"]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                          timeout=SECONDS + 240, stdin=subprocess.DEVNULL)


def test_fuzzing_the_admin_api_from_its_document(gproxy, fast_store, tmp_path):
    st = schemathesis()
    probe = str(tmp_path / "hub-probe.log")
    gp = gproxy([], config={"gproxy": {"store": {"path": os.path.join(fast_store, "s.yaml")}}},
                env={"GPROXY_HUB_PROBE": probe})
    started = time.time()
    for phase in ("coverage", "fuzzing", "stateful"):
        run = run_phase(st, gp, phase, str(tmp_path))
        report = run.stdout + run.stderr
        assert run.returncode == 0, "schemathesis %s phase (seed %s):\n%s" % (
            phase, SEED, report[-12000:])
        tested = re.search(r"Tested: (\d+)", report)
        assert tested and int(tested.group(1)) >= 10, report[-3000:]
        cases = re.search(r"(\d+) generated", report)
        print("%s: %s operations, %s cases, %.0fs" % (phase, tested.group(1),
              cases.group(1) if cases else "?", time.time() - started))
    holds, passes = hubprobe.read(probe, started)
    worst = max(holds, key=lambda hold: hold[1], default=(0.0, 0.0))
    print("fuzzed for %.0fs: %d late ticks, the longest %.1f ms (%.1f ms on a CPU); "
          "%d collections, the longest %.1f ms" % (
              time.time() - started, len(holds), worst[0], worst[1], len(passes),
              max((ms for _, ms in passes), default=0.0)))
    assert worst[1] < HOLD_BUDGET_MS, "the hub was held %.1f ms on a CPU (budget %.0f)" % (
        worst[1], HOLD_BUDGET_MS)
    assert "Traceback" not in gp.log()
