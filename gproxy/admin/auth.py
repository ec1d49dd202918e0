"""Who may use the Admin API: the client-address allowlist and the admin keys.

APISIX's rules (docs/apisix-behaviour.md §6): the token comes from the
``api_key`` query argument, the ``X-API-KEY`` header or the ``x_api_key``
cookie; a ``viewer`` key may only read.  Keys are compared in constant time
over every configured key, so the answer's timing says nothing about how
much of a guess was right or which key it was close to.
"""

import hashlib
import hmac
import ipaddress

from flask import Response, request

from gproxy.admin.resources import json_response

FORBIDDEN_PAGE = ("<html><head><title>403 Forbidden</title></head><body>"
                  "<center><h1>403 Forbidden</h1></center></body></html>\n")
READ_METHODS = ("GET", "HEAD", "OPTIONS")


def request_token():
    return (request.args.get("api_key") or request.headers.get("X-API-KEY")
            or request.cookies.get("x_api_key"))


def _digest(text):
    # Equal-length digests: compare_digest then leaks neither content nor length.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def role_for(token, keys):
    """The role of the key equal to ``token``, or None; every key is compared."""
    given = _digest(token)
    role = None
    for entry in keys:
        if hmac.compare_digest(given, _digest(entry["key"])):
            role = role or entry.get("role", "admin")
    return role


def _denied(description):
    return json_response({"error_msg": "failed to check token",
                          "description": description}, 401)


def check_token(cfg):
    """None if the request may go on, else the 401 response (APISIX wording)."""
    keys = cfg["deployment.admin.admin_key"]
    if not cfg["deployment.admin.admin_key_required"] or not keys:
        return None
    token = request_token()
    if not token:
        return _denied("missing apikey")
    role = role_for(token, keys)
    if role is None:
        return _denied("wrong apikey")
    if role == "viewer" and request.method not in READ_METHODS:
        return _denied("invalid method for role viewer")
    return None


def client_allowed(cfg):
    """``deployment.admin.allow_admin``: is the peer in one of the CIDRs?"""
    try:
        addr = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net
               for net in cfg["deployment.admin.allow_admin"])


def forbidden():
    """nginx's plain 403 page, as APISIX answers a client outside allow_admin."""
    return Response(FORBIDDEN_PAGE, 403, mimetype="text/html")
