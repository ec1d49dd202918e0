"""The package layout's rules that import-linter cannot see.

``lint-imports`` (run by scripts/test.sh) checks who imports whom; these tests
check what a module *does* at import time or in its code: only ``gproxy.cli``
may monkey-patch or read ``sys.argv``, and importing any gproxy module patches
nothing.
"""

import ast
import importlib
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted(p for pkg in ("gproxy", "admin_ui") for p in (ROOT / pkg).rglob("*.py"))


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _offences(tree):
    """Names in ``tree`` that patch or read argv: monkey, patch_all, sys.argv."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("patch_all", "argv"):
            found.append("%s (line %d)" % (node.attr, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and "monkey" in node.module:
            found.append("from %s import (line %d)" % (node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and any(a.name == "monkey" for a in node.names):
            found.append("import monkey (line %d)" % node.lineno)
        elif isinstance(node, ast.Import) and any("monkey" in a.name for a in node.names):
            found.append("import monkey (line %d)" % node.lineno)
    return found


def test_the_sources_were_found():
    names = {_module_name(p) for p in SOURCES}
    assert {"gproxy.cli", "gproxy.protocols.mqtt", "gproxy.proxy.session.session",
            "gproxy.runtime.app", "admin_ui"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=_module_name)
def test_only_the_cli_patches_or_reads_argv(path):
    offences = _offences(ast.parse(path.read_text(), str(path)))
    if _module_name(path) == "gproxy.cli":
        assert offences, "the check must see the CLI's own patch_all and argv"
    else:
        assert not offences, "%s: %s" % (_module_name(path), ", ".join(offences))


def test_importing_every_module_patches_nothing():
    """In a fresh interpreter: import all of gproxy and admin_ui, compare the stdlib."""
    modules = [_module_name(p) for p in SOURCES
               if _module_name(p) not in ("gproxy.__main__",)]
    code = "\n".join([
        "import socket, threading, time, select, ssl",
        "before = (socket.socket, threading.Thread, threading.Lock, time.sleep, select.select)",
        "import importlib",
        "for name in %r: importlib.import_module(name)" % modules,
        "after = (socket.socket, threading.Thread, threading.Lock, time.sleep, select.select)",
        "import gevent.monkey",
        "assert before == after, 'patched on import'",
        "assert not gevent.monkey.is_anything_patched(), 'gevent says it patched'",
        "print('ok', len(%r))" % modules,
    ])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_this_process_is_not_patched_either():
    """The unit tests themselves run unpatched (a guard for the test above)."""
    for name in ("gproxy.runtime.app", "gproxy.proxy.session.session", "gproxy.admin.app"):
        importlib.import_module(name)
    assert socket.socket.__module__ == "socket"
    assert threading.Thread.__module__ == "threading"
    assert time.sleep.__module__ == "time"


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_starting_embedded_gproxy_patches_nothing(tmp_path, mode):
    """``gproxy.start`` runs gproxy in a child process, or on its own hub in a thread:
    either way the host stays unpatched."""
    code = "\n".join([
        "import socket, threading, time, select",
        "state = lambda: (socket.socket, threading.Thread, threading.Lock, time.sleep,"
        " select.select)",
        "before = state()",
        "import gproxy",
        "assert state() == before, 'patched on import'",
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()",
        "proxy = gproxy.start({'apisix': {'stream_proxy': {'tcp': ['127.0.0.1:%%d' %% port]}},"
        " 'deployment': {'admin': False},"
        " 'gproxy': {'store': {'path': %r}}}, mode=%r)" % (str(tmp_path / "apisix.yaml"), mode),
        "assert state() == before, 'patched by start()'",
        "import gevent.monkey",
        "assert not gevent.monkey.is_anything_patched(), 'gevent says it patched'",
        "proxy.stop()",
        "assert state() == before, 'patched by stop()'",
        "print('ok')",
    ])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
