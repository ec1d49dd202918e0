"""APISIX's control API, the part gproxy has: ``GET /v1/healthcheck``.

``/v1/healthcheck`` lists every health checker as APISIX does
(``apisix/control/v1.lua``): ``[{"name": "/apisix/upstreams/1", "type":
"tcp", "nodes": [{"ip", "port", "status", "counter": {"success",
"http_failure", "tcp_failure", "timeout_failure"}}]}]``.
``/v1/healthcheck/<src_type>/<src_id>`` returns one, for ``upstreams`` and
(gproxy's stream counterpart of APISIX's ``routes``) ``stream_routes``, with
APISIX's error bodies.  A browser (``Accept: text/html``) gets APISIX's
status table.  Anything else is a JSON 404.
"""

import html
import json

SRC_TYPES = ("upstreams", "stream_routes", "routes", "services")


def _json(start_response, status, body):
    data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]


def _html(start_response, checkers):
    rows = []
    index = 0
    for checker in checkers:
        for node in checker["nodes"]:
            index += 1
            ok = node["status"] in ("healthy", "mostly_healthy")
            counter = node["counter"]
            cells = [index, checker["name"], checker["type"],
                     "%s:%s" % (node["ip"], node["port"]), node["status"],
                     counter["success"], counter["tcp_failure"], counter["http_failure"],
                     counter["timeout_failure"]]
            rows.append("<tr%s>%s</tr>" % ("" if ok else ' bgcolor="#FF0000"', "".join(
                "<td>%s</td>" % html.escape(str(c)) for c in cells)))
    head = ("Index", "Upstream", "Check type", "Host", "Status", "Success counts",
            "TCP Failures", "HTTP Failures", "TIMEOUT Failures")
    page = ("<html><head><title>APISIX upstream check status</title></head><body>"
            "<h1>APISIX upstream check status</h1><table border=\"1\"><tr>%s</tr>%s"
            "</table></body></html>" % ("".join("<th>%s</th>" % h for h in head),
                                        "".join(rows)))
    data = page.encode()
    start_response("200 OK", [("Content-Type", "text/html"),
                              ("Content-Length", str(len(data)))])
    return [data]


def create_control_app(health):
    """The control API as a WSGI app; ``health()`` gives the checkers' list."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "").rstrip("/")
        if environ.get("REQUEST_METHOD") != "GET" or not path.startswith("/v1/healthcheck"):
            return _json(start_response, "404 Not Found", {"error_msg": "not found"})
        checkers = health()
        segs = path.split("/")[3:]  # after "", "v1", "healthcheck"
        if segs:
            if len(segs) < 2:
                return _json(start_response, "404 Not Found", {
                    "error_msg": "missing src id for src type %s" % segs[0]})
            src_type, src_id = segs[0], segs[1]
            if src_type not in SRC_TYPES:
                return _json(start_response, "400 Bad Request",
                             {"error_msg": "invalid src type %s" % src_type})
            name = "/apisix/%s/%s" % (src_type, src_id)
            found = [c for c in checkers if c["name"] == name]
            if not found:
                return _json(start_response, "404 Not Found",
                             {"error_msg": "%s[%s] not found" % (src_type, src_id)})
            checkers = found
        if "text/html" in environ.get("HTTP_ACCEPT", ""):
            return _html(start_response, checkers)
        return _json(start_response, "200 OK", checkers[0] if segs else checkers)

    return app
