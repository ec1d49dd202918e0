"""Read-only views of a running gproxy for machines: the control API and metrics.

Owns: APISIX's control API (``api``: ``GET /v1/healthcheck`` in APISIX's
JSON shape) and the Prometheus exposition (``metrics``: a collector that
reads the registry's counters at scrape time).  Each is a plain WSGI app fed
by callables the runtime hands over (``stats()``, ``health()``), so the same
code serves one process or a ``--workers`` parent's merged view.  Must not
import the data path, the store, the Admin API, Flask or the runtime; the
runtime serves these apps on their own capped listeners.
"""
