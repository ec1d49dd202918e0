"""What a test does when a tool it needs (mosquitto, chromium, etcd, curl, paho,
Playwright, schemathesis) is missing.

On a developer's machine it is skipped, with the command that installs the
tool.  In CI (``CI=true``, as ``.ci/run`` sets) a skip would let a run pass
with whole suites untested, so there it fails instead.  ``module`` is the
same for a Python package (in place of ``pytest.importorskip``, which skips
in CI too).
"""

import importlib
import os

import pytest


def in_ci(environ=None):
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() in ("true", "1", "yes")


def require(available, message, environ=None, module_level=False):
    """Return if ``available``; else skip (a developer's machine) or fail (CI)."""
    if available:
        return
    if in_ci(environ):
        pytest.fail("%s; CI=true, so this fails instead of skipping" % message, pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def module(name, install, environ=None):
    """The module ``name``; if it cannot be imported, skip the calling test module
    (a developer's machine) or fail it (CI).  ``install`` says how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, "needs %s (%s): %s" % (name, install, exc), environ, module_level=True)
