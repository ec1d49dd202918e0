"""How gproxy reaches etcd: APISIX's ``deployment.etcd.tls``, ``user`` and ``password``.

``EtcdAccess`` holds what every request to the cluster shares:

* TLS, for ``https://`` endpoints, with APISIX's meaning (``core/etcd.lua``,
  ``cli/etcd.lua``): the server's certificate is verified unless
  ``tls.verify`` is false, against ``apisix.ssl.ssl_trusted_certificate``
  (``system``: the operating system's store); ``tls.sni`` is the name sent
  and checked (default: the URL's host); ``tls.cert``/``tls.key`` are the
  client certificate.
* Authentication, as lua-resty-etcd does it: ``POST /v3/auth/authenticate``
  with ``{name, password}`` gives a token, sent as ``Authorization`` with
  every request and fetched again after 3 minutes plus up to one at random
  (etcd's simple tokens live 5), or at once when etcd answers ``invalid auth
  token`` (etcd restarted).  A refused login reads as APISIX says it:
  ``got malformed auth message: "<etcd's answer>" from etcd "<url>"`` when
  gproxy starts (``apisix start``'s words), ``authenticate refresh token fail``
  afterwards (lua-resty-etcd's).  The password is never logged.

Blocking (``requests``); the caller keeps it off the hub.
"""

import logging
import random
import ssl
import threading
import time
import warnings

import requests
from etcd3gw.exceptions import ConnectionTimeoutError
from requests.adapters import HTTPAdapter

from gproxy.errors import StoreUnavailable

log = logging.getLogger("gproxy.store")
TOKEN_LIFE = 180.0  # lua-resty-etcd: 3 min + random(0, 60) s
REFRESH_FAILED = "authenticate refresh token fail"


def reason(exc):
    """lua-resty-http's words for why a request failed."""
    text = "%s %s" % (getattr(exc, "detail_text", None) or "", exc)
    if isinstance(exc, (ConnectionTimeoutError, requests.Timeout)) or \
            "timed out" in text:
        return "timeout"
    if "Connection refused" in text:
        return "connection refused"
    if "Connection reset" in text:
        return "connection reset by peer"
    if "CERTIFICATE_VERIFY_FAILED" in text or "doesn't match" in text:
        return "certificate verify failed"
    if "SSL" in text:
        return "handshake failed"
    return "closed"


class AuthRefused(StoreUnavailable):
    """etcd refused the user and password; ``body`` is its answer."""

    def __init__(self, message, body):
        super().__init__(message)
        self.body = body


class _SniAdapter(HTTPAdapter):
    """Sends (and checks the certificate against) ``sni`` instead of the URL's host."""

    def __init__(self, sni):
        self.sni = sni
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs.update(server_hostname=self.sni, assert_hostname=self.sni)
        super().init_poolmanager(*args, **kwargs)


def system_ca():
    """Where the OS keeps its trusted certificates (``True``: requests' own bundle)."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


class EtcdAccess:
    """TLS settings and the auth token shared by every endpoint of one cluster."""

    def __init__(self, user=None, password=None, verify=True, ca="system", cert=None,
                 key=None, sni=None):
        self.user, self._password = user, password
        self.verify = (system_ca() if ca in (None, "", "system") else ca) if verify else False
        self.cert = (cert, key) if cert and key else None
        self.sni = sni
        self.token = None
        self._token_until = 0.0
        self._lock = threading.Lock()  # one login at a time, whichever thread asks
        if not verify:
            warnings.filterwarnings("ignore", message="Unverified HTTPS request")

    @property
    def auth(self):
        return bool(self.user and self._password)

    def session(self):
        """A ``requests`` session with this cluster's TLS settings."""
        s = requests.Session()
        s.trust_env = False  # APISIX's settings, not REQUESTS_CA_BUNDLE or HTTP_PROXY
        s.verify = self.verify
        if self.cert:
            s.cert = self.cert
        if self.sni:
            s.mount("https://", _SniAdapter(self.sni))
        return s

    def headers(self, endpoint, timeout, starting=False):
        """``{"Authorization": token}`` (logging in first if needed), or ``{}``."""
        if not self.auth:
            return {}
        with self._lock:
            if self.token is None or time.monotonic() >= self._token_until:
                self._login(endpoint, timeout, starting)
            return {"Authorization": self.token}

    def forget(self, token):
        """etcd no longer knows ``token``: the next request logs in again."""
        with self._lock:
            if self.token == token:
                self.token = None

    def _login(self, endpoint, timeout, starting):
        url = endpoint.url + "/v3/auth/authenticate"
        try:
            resp = endpoint.session.post(url, json={"name": self.user,
                                                    "password": self._password},
                                         timeout=timeout)
        except requests.RequestException as exc:
            endpoint.failed(endpoint.window)
            raise StoreUnavailable("%s: %s" % (endpoint.url, reason(exc))) from None
        try:
            token = resp.json().get("token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            body = resp.text
            log.error("etcd: user %s was refused by %s", self.user, endpoint.url)
            if starting:
                raise AuthRefused('got malformed auth message: "%s" from etcd "%s"'
                                  % (body, url), body)
            raise AuthRefused(REFRESH_FAILED, body)
        self.token = token
        self._token_until = time.monotonic() + TOKEN_LIFE + random.uniform(0, 60)
