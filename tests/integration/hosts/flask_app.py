"""A Flask app served by gunicorn's sync workers, beside an embedded gproxy.

``GET /proxy`` answers from whichever worker took the request: its pid, and the
proxy's stats read over the Admin API's HTTP listener (the way a worker reaches
a proxy that its master runs).
"""

import json
import os
import urllib.request

from flask import Flask

app = Flask(__name__)


@app.get("/proxy")
def proxy():
    admin = os.environ["GPROXY_ADMIN"]
    request = urllib.request.Request("http://%s/apisix/admin/gproxy/stats" % admin,
                                     headers={"X-API-KEY": os.environ["GPROXY_ADMIN_KEY"]})
    with urllib.request.urlopen(request, timeout=10) as resp:
        stats = json.load(resp)
    return {"worker": os.getpid(), "live_sessions": stats["live_sessions"]}
