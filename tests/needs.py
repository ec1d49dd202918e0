"""What a test does when a tool it needs (mosquitto, chromium, Playwright) is missing.

On a developer's machine it is skipped, with the command that installs the
tool.  In CI (``CI=true``, as ``.ci/run`` runs) a skip would let a run pass
with whole suites untested, so there it fails instead.
"""

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
