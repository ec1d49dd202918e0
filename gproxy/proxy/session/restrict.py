"""The ``ip_restriction`` phase: APISIX's stream ``ip-restriction`` plugin.

Runs once the route and its upstream are known and before anything is read
from the client (APISIX runs it first among the preread plugins, priority
3000); when the CONNECT chooses the route (routes with ``vars``), right after
the refine, as the route is not known before.  A refused client is closed at once with the plugin's exit line
(APISIX's run_plugin: ``ip-restriction exits with status code 403``),
counted as ``ip_restriction`` like a limit-conn refusal.  The address checked
is the session's client address (the PROXY protocol's source, when the
listener reads one).
"""

import logging

from gproxy.errors import Reject


def ip_restriction(s):
    route = s.route
    if route is None:
        return  # the CONNECT chooses the route: the refine phase runs this
    restriction = route.ip_restriction
    if restriction is None:
        return
    code = restriction.refuses(s.info.client_addr)
    if code is not None:
        raise Reject("ip_restriction", logging.WARNING,
                     "ip-restriction exits with status code %d", code, status=code)
