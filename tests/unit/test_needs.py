"""A missing mosquitto or chromium skips on a developer's machine and fails in CI.

``tests.needs.require`` is what the integration conftest (mosquitto), the
dashboard tests (Playwright, chromium), the etcd and curl tests call, and
``tests.needs.module`` what the tests that import paho or Playwright call.  Checked directly, and in a
child pytest run over a throwaway test module, where a module-level
requirement must turn into a skip without CI and a failed run with CI=true.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.needs import in_ci, module, require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True),
    ("", False), ("false", False), ("0", False), (None, False)])
def test_in_ci(value, expected):
    environ = {} if value is None else {"CI": value}
    assert in_ci(environ) is expected


def test_available_is_a_no_op():
    require(True, "never shown", environ={"CI": "true"})
    require(True, "never shown", environ={})


def test_missing_skips_outside_ci():
    with pytest.raises(pytest.skip.Exception, match="^needs mosquitto$"):
        require(False, "needs mosquitto", environ={})


def test_missing_fails_in_ci():
    with pytest.raises(pytest.fail.Exception,
                       match="^needs mosquitto; CI=true, so this fails instead of skipping$"):
        require(False, "needs mosquitto", environ={"CI": "true"})


def test_a_module_that_imports_is_returned():
    assert module("json", "never shown", environ={"CI": "true"}).dumps([]) == "[]"


def test_a_missing_module_skips_outside_ci_and_fails_in_ci():
    with pytest.raises(pytest.skip.Exception, match="^needs no_such_module_xyz "):
        module("no_such_module_xyz", "pip install it", environ={})
    with pytest.raises(pytest.fail.Exception, match="CI=true, so this fails instead"):
        module("no_such_module_xyz", "pip install it", environ={"CI": "true"})


def test_ci_run_sets_ci_itself():
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        assert "\nexport CI=true\n" in fh.read()


def test_no_test_module_skips_on_its_own():
    """``importorskip`` skips under CI too: every test module uses ``needs.module``
    instead (seven had crept back in with merged branches)."""
    call = "pytest." + "importorskip("  # split, so this file does not find itself
    found = []
    for folder, _, names in os.walk(os.path.join(ROOT, "tests")):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as fh:
                    if call in fh.read():
                        found.append(os.path.relpath(os.path.join(folder, name), ROOT))
    assert found == []


MODULE = textwrap.dedent('''
    from tests.needs import require

    require(False, "needs chromium (apt-get install chromium)", module_level=True)

    def test_never_runs():
        pass
''')


@pytest.mark.parametrize("ci, code, outcome", [
    (None, 0, "1 passed, 1 skipped"),
    ("true", 2, "1 error"),  # a collection error: pytest runs nothing and exits 2
])
def test_a_module_level_requirement_in_a_real_run(tmp_path, ci, code, outcome):
    (tmp_path / "test_needs_chromium.py").write_text(MODULE)
    (tmp_path / "test_other.py").write_text("def test_runs():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = ROOT
    if ci is not None:
        env["CI"] = ci
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == code, run.stdout + run.stderr
    assert outcome in run.stdout.splitlines()[-1], run.stdout
    if ci:
        assert "CI=true, so this fails instead of skipping" in run.stdout
