"""The gproxy dashboard: a Flask blueprint of static pages that drive the Admin API.

``create_blueprint()`` serves one HTML page at ``/ui/``, its plain JS and CSS
under ``/ui/static/`` (no build step, nothing from a CDN, works offline) and a
redirect from ``/`` to ``/ui/``.  Everything the pages show or change goes
through the APISIX-compatible Admin API with ``fetch()`` and the admin key the
user typed (kept in the tab's sessionStorage).  This package must not import
the proxy or hold state: the admin listener mounts it next to the API, that
is all it knows about gproxy.
"""

from importlib import metadata

from flask import Blueprint, redirect, render_template, url_for

__all__ = ["create_blueprint"]

#: The page runs only its own files; scripts can talk only to this origin, and
#: a form can never be submitted natively (so a key cannot leak into a URL).
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgrade never runs stale JS
}


def _version():
    try:
        return metadata.version("gproxy")
    except metadata.PackageNotFoundError:
        return ""


def create_blueprint(name="admin_ui"):
    """The dashboard blueprint; register it on the admin Flask app (no url_prefix)."""
    bp = Blueprint(name, __name__, static_folder="static", static_url_path="/ui/static",
                   template_folder="templates")
    version = _version()

    @bp.get("/")
    def root():
        return redirect(url_for(".index"))

    @bp.get("/ui/")
    def index():
        return render_template("dashboard.html", version=version)

    @bp.after_request
    def security_headers(resp):
        for key, value in HEADERS.items():
            resp.headers.setdefault(key, value)
        return resp

    return bp
