"""Asking the other instances' Admin APIs, all at once and within a deadline.

A fleet-wide answer is put together from each instance's own: ``ask(peers,
call)`` runs ``call(peer)`` for every peer in its own greenlet, waits at most
``timeout`` seconds for all of them, and reports each peer that failed or did
not answer in time by id, address and reason, so a caller can name them
rather than leave them silently out.  ``get_json`` is one request with the
caller's admin key (``X-API-KEY``), as the operator's own request carried
it: a peer checks it like any other client.  Over HTTPS a peer's certificate
is checked against ``deployment.admin.admin_api_mtls.admin_ssl_ca_cert`` when
set (and this instance's own admin certificate is presented, for peers that
require one), else the system's store.

``requests`` blocks; ``blocking`` keeps it off the hub (cooperative sockets
in the ``gproxy`` command, the threadpool when embedded).
"""

import functools
import logging

import gevent
import requests

from gproxy.store.etcdclient import blocking
from gproxy.store.etcdconn import reason, system_ca

log = logging.getLogger("gproxy.fleet")


class PeerError(Exception):
    """A peer's answer could not be had; ``str()`` says why in a few words."""


class Peers:
    """HTTP to other instances' Admin APIs."""

    def __init__(self, timeout, ca=None, cert=None, key=None):
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no HTTP_PROXY between instances
        self.session.verify = ca or system_ca()
        if ca and cert and key:
            self.session.cert = (cert, key)

    def get_json(self, base, path, params, token):
        """The JSON of ``GET <base><path>?params``; PeerError when it cannot be had."""
        headers = {"X-API-KEY": token} if token else {}
        try:
            resp = blocking(functools.partial(self.session.get, base + path, params=params,
                                              headers=headers, timeout=self.timeout))
        except requests.RequestException as exc:
            raise PeerError(reason(exc)) from None
        if resp.status_code != 200:
            raise PeerError("HTTP %d: %s" % (resp.status_code, _error(resp)))
        try:
            return resp.json()
        except ValueError:
            raise PeerError("not JSON") from None

    def ask(self, peers, call):
        """``([(peer, answer)], [{"id", "admin", "error"}])`` for ``call(peer)`` on each."""
        def guarded(peer):
            try:
                return True, call(peer)
            except PeerError as exc:
                return False, str(exc)
            except Exception as exc:  # a bug: logged, and the peer named as failed
                log.exception("fleet: asking %s failed", peer.get("admin"))
                return False, "failed: %s" % type(exc).__name__
        calls = [(peer, gevent.spawn(guarded, peer)) for peer in peers]
        gevent.joinall([g for _, g in calls], timeout=self.timeout + 0.5)
        answers, missing = [], []
        for peer, greenlet in calls:
            ok, value = greenlet.value if greenlet.ready() else (False, "timeout")
            if not greenlet.ready():
                greenlet.kill(block=False)
            if ok:
                answers.append((peer, value))
            else:
                missing.append({"id": peer["id"], "admin": peer.get("admin"), "error": value})
        return answers, missing

    def close(self):
        self.session.close()


def _error(resp):
    try:
        body = resp.json()
        return body.get("error_msg") or body.get("message") or resp.reason
    except (ValueError, AttributeError):
        return resp.reason
