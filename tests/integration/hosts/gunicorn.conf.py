"""gunicorn settings for a Flask app with sync workers and one embedded gproxy.

The proxy belongs to the master (the arbiter): started in ``on_starting``, before
gunicorn binds its own listeners or forks a worker, and stopped in ``on_exit``,
after the workers are gone.  The handle is kept on the arbiter, which outlives a
SIGHUP (gunicorn re-reads this file then, and its globals start afresh); a reload
neither starts a second proxy nor loses the first.  Workers fork from the master
without the proxy: to manage routes from a worker, call the Admin API over HTTP.

GPROXY_CONFIG (a config file) and GPROXY_MODE (process or thread) come from the
environment (test_embedded_frameworks.py sets them).
"""

import os

import gproxy

worker_class = "sync"
workers = 2
graceful_timeout = 10


def on_starting(server):
    server.gproxy = gproxy.start(os.environ["GPROXY_CONFIG"],
                                 mode=os.environ.get("GPROXY_MODE", "process"))
    server.log.info("gproxy (%s mode) listening on %s", server.gproxy.mode,
                    server.gproxy.addresses)


def on_exit(server):
    proxy = getattr(server, "gproxy", None)
    if proxy is not None:
        proxy.stop(grace=5)
