"""The Admin API for the program gproxy is embedded in: same app, no key, no socket.

Runs where the ``Gproxy`` runs (on the hub thread, or in the process mode's
child).  The caller is the program itself, so the token and the address
allowlist that guard the HTTP listener do not apply; everything else (checks,
status codes, APISIX's error bodies) is the Admin API's own code, called with
Flask's test client: one implementation, not a second copy that could drift.
"""

import copy
import ipaddress


def local_admin(app, cfg):
    """A Flask test client of ``app``'s Admin API without the key or address gate."""
    from gproxy.admin.app import create_app
    local = copy.copy(cfg)
    local.values = dict(cfg.values)
    local.values["deployment.admin.admin_key_required"] = False
    local.values["deployment.admin.allow_admin"] = [ipaddress.ip_network("127.0.0.1/32")]
    return create_app(app.store, app.live(), local, fleet=app.fleet).test_client()


def request(client, method, path, data, query):
    """``(status, text)`` of one Admin API request through ``client``."""
    resp = client.open(path, method=method, data=data, query_string=query,
                       content_type="application/json")
    return resp.status_code, resp.get_data(as_text=True)
