"""etcd's v3 JSON gateway, as APISIX talks to it, on the ``etcd3gw`` client.

Owns the endpoints (``deployment.etcd.host``), APISIX's endpoint health rule
(lua-resty-etcd: an endpoint that failed 3 times is skipped for
``health_check_timeout`` seconds; with none left a request fails with
``has no healthy etcd endpoint available``), APISIX's error wording for an
unreachable etcd (``http://127.0.0.1:2379: connection refused``), the KV and
lease calls the store and the fleet need, and one watch stream.  TLS and
user/password come from ``etcdconn.EtcdAccess``.

Every call here blocks (``requests`` underneath).  ``blocking(func)`` runs one
where it cannot hold the hub: straight in the calling greenlet in a
monkey-patched process (the ``gproxy`` command, where sockets cooperate), in
the hub's threadpool otherwise (gproxy embedded in an unpatched program).
The watch stream runs in its own thread (see ``gproxy.store.etcd``).
"""

import base64
import json
import logging
import socket
import time
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exc

from gproxy.errors import StoreUnavailable
from gproxy.hub import monkey_patched
from gproxy.store.etcdconn import EtcdAccess, reason as _reason
from gproxy.store.threads import in_threadpool

log = logging.getLogger("gproxy.store")
MAX_FAILS = 3  # lua-resty-etcd's health check, as APISIX configures it
NO_HEALTHY = "has no healthy etcd endpoint available"


class Compacted(Exception):
    """The watch's start revision was compacted away: reload everything."""


def blocking(func, *args):
    """Run a blocking etcd call without holding the hub; its exception comes back here."""
    if monkey_patched():
        return func(*args)
    return in_threadpool(func, *args)


def b64(data):
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def unb64(text):
    return base64.b64decode(text or "")


class Endpoint:
    """One etcd URL, its etcd3gw client, and its failure count."""

    def __init__(self, url, timeout, access, window):
        parts = urlsplit(url)
        self.url = url
        self.window = window  # health_check_timeout
        self.session = access.session()
        # api_path fixed to /v3/ as APISIX does (etcd >= 3.4): no discovery request
        self.client = etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port or 2379,
                                          protocol=parts.scheme, timeout=timeout,
                                          api_path="/v3/", session=self.session)
        self.fails = []  # monotonic times of recent failures
        self.down_until = 0.0

    def healthy(self, now):
        return now >= self.down_until

    def failed(self, window):
        now = time.monotonic()
        self.fails = [t for t in self.fails if now - t < window] + [now]
        if len(self.fails) >= MAX_FAILS:
            self.down_until, self.fails = now + window, []

    def succeeded(self):
        self.fails, self.down_until = [], 0.0


class Cluster:
    """The configured endpoints, tried round robin, skipping unhealthy ones."""

    def __init__(self, hosts, timeout, health_check_timeout, access=None):
        self.access = access or EtcdAccess()
        self.endpoints = [Endpoint(h, timeout, self.access, health_check_timeout)
                          for h in hosts]
        self.timeout = timeout
        self.window = health_check_timeout
        self.starting = True  # until the first answer: a refused login is apisix start's error
        self._next = 0

    def choose(self):
        now = time.monotonic()
        for _ in self.endpoints:
            endpoint = self.endpoints[self._next % len(self.endpoints)]
            self._next += 1
            if endpoint.healthy(now):
                return endpoint
        raise StoreUnavailable(NO_HEALTHY)

    def call(self, path, payload):
        """One KV or lease request (blocking): the JSON answer, or StoreUnavailable in
        APISIX's words.

        The calls used are idempotent (a lease grant at worst makes one that
        expires unused), so one that failed on a kept-alive connection etcd had
        closed is sent once more on a fresh one, and one refused for a token
        etcd forgot (it restarted) once more after logging in again.
        """
        endpoint = self.choose()
        for attempt in (1, 2):
            headers = self.access.headers(endpoint, self.timeout, self.starting)
            try:
                body = endpoint.client.post(endpoint.client.get_url(path), json=payload,
                                            headers=headers)
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError,
                    etcd_exc.InternalServerError) as exc:
                if exc.args:  # an HTTP status from etcd, not a transport error
                    endpoint.failed(self.window)
                    code = 500 if isinstance(exc, etcd_exc.InternalServerError) else 503
                    raise StoreUnavailable("invalid response code: %d" % code) from None
                reason = _reason(exc)
                if attempt == 1 and reason in ("closed", "connection reset by peer"):
                    continue
                endpoint.failed(self.window)
                raise StoreUnavailable("%s: %s" % (endpoint.url, reason)) from None
            except etcd_exc.Etcd3Exception as exc:
                endpoint.succeeded()
                error = _error_text(exc.detail_text)
                if attempt == 1 and "invalid auth token" in error and headers:
                    self.access.forget(headers["Authorization"])
                    continue
                raise StoreUnavailable(error) from None
            endpoint.succeeded()
            self.starting = False
            return body

    def range(self, key, end):
        return self.call("/kv/range", {"key": b64(key), "range_end": b64(end)})

    def range_prefix(self, prefix):
        """Every key under ``prefix``."""
        return self.range(prefix, prefix_end(prefix))

    def put(self, key, value, lease=None):
        payload = {"key": b64(key), "value": b64(value), "prev_kv": True}
        if lease:
            payload["lease"] = lease
        return self.call("/kv/put", payload)

    def delete(self, key):
        return self.call("/kv/deleterange", {"key": b64(key), "prev_kv": True})

    # -- leases (etcd v3 replaces v2's TTL with them, as APISIX's core.etcd uses) --
    def grant(self, ttl):
        """A new lease of ``ttl`` seconds; its id (a decimal string)."""
        return self.call("/lease/grant", {"TTL": int(ttl)})["ID"]

    def keepalive(self, lease):
        """Renew ``lease`` to its full TTL; the TTL, 0 when etcd no longer has it."""
        body = self.call("/lease/keepalive", {"ID": lease})
        return int((body.get("result") or body).get("TTL") or 0)

    def revoke(self, lease):
        """End ``lease`` and delete its keys now (a lease already gone is fine)."""
        try:
            self.call("/lease/revoke", {"ID": lease})
        except StoreUnavailable as exc:
            if "lease not found" not in str(exc):
                raise

    def version(self):
        """etcd's ``/version`` answer (``{"etcdserver", "etcdcluster"}``)."""
        endpoint = self.choose()
        try:
            resp = endpoint.session.get(endpoint.url + "/version", timeout=self.timeout)
            return resp.json()
        except (requests.RequestException, ValueError) as exc:
            raise StoreUnavailable("%s: %s" % (endpoint.url, _reason(exc))) from None

    def close(self):
        for endpoint in self.endpoints:
            endpoint.session.close()


def prefix_end(prefix):
    """The range end that covers every key starting with ``prefix`` (etcd's rule)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def _error_text(detail):
    """etcd's own error, as APISIX reports ``res.body.error``."""
    try:
        return json.loads(detail).get("error") or detail
    except (TypeError, ValueError, AttributeError):
        return str(detail)


class WatchStream:
    """One open ``/v3/watch`` request; ``messages()`` yields each decoded result.

    ``interrupt()`` (from any thread) shuts its socket so a blocked read ends
    at once; a read also ends after ``watch_timeout`` seconds of silence.
    """

    def __init__(self, cluster, key, end, start_revision, watch_timeout):
        self.endpoint = cluster.choose()
        self.session = cluster.access.session()
        request = {"create_request": {"key": b64(key), "range_end": b64(end),
                                      "start_revision": start_revision}}
        try:
            headers = cluster.access.headers(self.endpoint, cluster.timeout)
            self.resp = self.session.post(self.endpoint.client.get_url("/watch"),
                                          json=request, stream=True, headers=headers,
                                          timeout=(cluster.timeout, watch_timeout))
        except requests.RequestException as exc:
            self.session.close()
            self.endpoint.failed(cluster.window)
            raise StoreUnavailable("%s: %s" % (self.endpoint.url, _reason(exc))) from None
        if self.resp.status_code != 200:
            self.close()
            raise StoreUnavailable("invalid response code: %d" % self.resp.status_code)
        self.endpoint.succeeded()

    def messages(self):
        buf = b""
        for chunk in self.resp.iter_content(chunk_size=None):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    message = json.loads(line)
                    if "error" in message:
                        raise StoreUnavailable(_error_text(json.dumps(message["error"])))
                    yield message.get("result") or {}

    def interrupt(self):
        try:
            sock = self.resp.raw.connection.sock
            sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass  # already closed: the read has ended or will on its timeout

    def close(self):
        self.resp.close()
        self.session.close()
