"""This Django process's one embedded gproxy (``proxy``), started on demand."""

import os
import sys

import gproxy

proxy = None


def serving_runserver():
    """True in the process ``runserver`` serves from: not in its autoreloader's
    watcher (RUN_MAIN is set only in the child it serves from), and not for other
    management commands."""
    if sys.argv[1:2] != ["runserver"]:
        return False
    return "--noreload" in sys.argv or os.environ.get("RUN_MAIN") == "true"


def start():
    global proxy
    if proxy is None:
        proxy = gproxy.start(os.environ["GPROXY_CONFIG"],
                             mode=os.environ.get("GPROXY_MODE", "process"))
    return proxy
