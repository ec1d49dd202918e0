"""APISIX's ``ssls`` resource: its schema and Admin checks, and which certificate
a TLS client's server name (SNI) selects.

Schema and messages follow ``apisix/schema_def.lua`` (``_M.ssl``) and
``apisix/ssl.lua`` ``check_ssl_conf``; PEM text is checked for structure here
(base64 of a DER SEQUENCE, as ``ngx.ssl.parse_pem_*`` would fail on anything
else) and loaded for real only by the data path.  ``CertIndex`` mirrors
``apisix/ssl/router/radixtree_sni.lua``: an exact name first, then the
longest wildcard, where ``*.x.com`` covers one label only (``a.x.com``, not
``a.b.x.com``), and ``*`` covers every name.  Pure: no ssl module, no files.
"""

import base64
import binascii

from gproxy.errors import SchemaError
from gproxy.model.resources import HOST_PATTERN, ID_SCHEMA, LABELS
from gproxy.model.schema import check

CERT = {"type": "string", "minLength": 128, "maxLength": 64 * 1024}
KEY = {"type": "string", "minLength": 64, "maxLength": 64 * 1024}
_SNI = {"type": "string", "pattern": r"^\*$|" + HOST_PATTERN, "maxLength": 256}
SSL_SCHEMA = {
    "type": "object",
    "properties": {
        "id": ID_SCHEMA,
        "desc": {"type": "string", "maxLength": 256},
        "labels": LABELS,
        "create_time": {"type": "integer"},
        "update_time": {"type": "integer"},
        "type": {"type": "string", "enum": ["server", "client"]},
        "cert": CERT,
        "key": KEY,
        "sni": _SNI,
        "snis": {"type": "array", "items": _SNI, "minItems": 1, "maxItems": 1024},
        "certs": {"type": "array", "items": CERT, "maxItems": 16},
        "keys": {"type": "array", "items": KEY, "maxItems": 16},
        "client": {"type": "object", "properties": {
            "ca": CERT,
            "depth": {"type": "integer", "minimum": 0},
            "skip_mtls_uri_regex": {"type": "array", "minItems": 1, "maxItems": 64,
                                    "uniqueItems": True,
                                    "items": {"type": "string", "maxLength": 4096}},
        }, "required": ["ca"]},
        "status": {"type": "integer", "enum": [1, 0]},
        "ssl_protocols": {"type": "array", "maxItems": 3, "uniqueItems": True,
                          "items": {"enum": ["TLSv1.1", "TLSv1.2", "TLSv1.3"]}},
    },
    "additionalProperties": False,
}
#: Fields that hold private keys: never in an Admin API answer or a log line.
SECRET_FIELDS = ("key", "keys")

_BEGIN, _DASHES = "-----BEGIN ", "-----"
_LABEL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ")
#: What a PEM body may hold between its markers: base64 and white space.
_NOT_BODY = str.maketrans(dict.fromkeys(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
_KEY_LABELS = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY")


def _label_end(text, start):
    """Where the label that starts at ``start`` ends (its ``-----`` begins), or -1."""
    end = text.find(_DASHES, start)
    if end <= start or not _LABEL_CHARS.issuperset(text[start:end]):
        return -1
    return end


def pem_sections(text):
    """``(label, body)`` for each ``-----BEGIN L----- ... -----END L-----`` in ``text``.

    A hand parser, linear in ``text`` (a backtracking pattern for the same
    shape took seconds on a ``cert`` of 2,000 spaces): the body runs from the
    BEGIN line to the next ``-`` and must be base64 and white space only; a
    section whose END does not follow, or names another label, is skipped.
    """
    out, pos = [], 0
    while True:
        begin = text.find(_BEGIN, pos)
        if begin < 0:
            return out
        pos = begin + 1
        label_at = begin + len(_BEGIN)
        label_end = _label_end(text, label_at)
        if label_end < 0:
            continue
        label = text[label_at:label_end]
        body_at = label_end + len(_DASHES)
        body_end = text.find("-", body_at)
        body = text[body_at:body_end] if body_end >= 0 else ""
        end_marker = "-----END %s-----" % label
        if body_end < 0 or body.translate(_NOT_BODY).strip() or \
                not text.startswith(end_marker, body_end):
            continue
        out.append((label, body))
        pos = body_end + len(end_marker)


def pem_blocks(text, labels):
    """The DER bytes of each PEM block of ``text`` whose label is in ``labels``."""
    out = []
    for label, body in pem_sections(text):
        if label not in labels:
            continue
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            continue
        if der[:1] == b"\x30":  # every certificate and key is a DER SEQUENCE
            out.append(der)
    return out


def _validate(cert, key=None):
    """``apisix/ssl.lua`` ``validate``: parse the cert, then the key (pairing unchecked)."""
    if not pem_blocks(cert, ("CERTIFICATE",)):
        return "failed to parse cert: PEM_read_bio_X509_AUX() failed"
    if key is not None and not pem_blocks(key, _KEY_LABELS):
        return "failed to parse key: PEM_read_bio_PrivateKey() failed"
    return None


def check_ssl(conf, pause=None):
    """Raise SchemaError with APISIX's message unless ``conf`` is a valid ssl object."""
    check(SSL_SCHEMA, conf, pause=pause)
    if conf.get("type", "server") == "server":
        if sum(all(k in conf for k in req) for req in (("sni", "key", "cert"),
                                                       ("snis", "key", "cert"))) != 1:
            raise SchemaError("invalid configuration: then clause did not match")
    elif not ("key" in conf and "cert" in conf):
        raise SchemaError("invalid configuration: else clause did not match")
    err = _validate(conf["cert"], conf["key"])
    if err:
        raise SchemaError(err)
    if conf.get("type") == "client":
        return
    certs, keys = conf.get("certs") or [], conf.get("keys") or []
    if len(certs) != len(keys):
        raise SchemaError("mismatched number of certs and keys")
    for i, (cert, key) in enumerate(zip(certs, keys), 1):
        err = _validate(cert, key)
        if err:
            raise SchemaError("failed to handle cert-key pair[%d]: %s" % (i, err))
    if conf.get("client"):
        err = _validate(conf["client"]["ca"])
        if err:
            raise SchemaError("failed to validate client_cert: " + err)


def without_secrets(value):
    """A copy of an ssl object fit to show: no private key (APISIX drops ``key``/``keys``)."""
    return {k: v for k, v in value.items() if k not in SECRET_FIELDS}


def _no_client_key(upstream):
    tls = upstream.get("tls")
    if not isinstance(tls, dict) or "client_key" not in tls:
        return upstream
    return dict(upstream, tls={k: v for k, v in tls.items() if k != "client_key"})


def redacted(value):
    """Any stored object fit for a log line: no ``key``/``keys``, and no upstream
    ``tls.client_key`` (its own or a route's inline upstream's)."""
    out = _no_client_key(without_secrets(value))
    if isinstance(out.get("upstream"), dict):
        out = dict(out, upstream=_no_client_key(out["upstream"]))
    return out


def normal_sni(name):
    """Lower case, no trailing dot: how APISIX compares server names."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class CertIndex:
    """Server certificates by the names they serve (enabled ``type: server`` objects)."""

    def __init__(self, ssls=()):
        self.exact = {}
        self.wild = []  # (suffix after "*", conf), longest suffix first
        self.star = None
        self.by_id = {}
        for conf in ssls:
            self.by_id[str(conf.get("id"))] = conf
            if conf.get("type", "server") != "server" or conf.get("status", 1) != 1:
                continue
            for name in conf.get("snis") or [conf["sni"]]:
                self._add(normal_sni(name), conf)
        self.wild.sort(key=lambda item: -len(item[0]))

    def _add(self, name, conf):
        if name == "*":
            self.star = self.star or conf
        elif name.startswith("*"):
            self.wild.append((name[1:], conf))
        else:
            self.exact.setdefault(name, conf)  # the first loaded wins

    def __len__(self):
        return len(self.by_id)

    def match(self, sni):
        """The ssl object for ``sni`` (already normalised), or None."""
        conf = self.exact.get(sni)
        if conf is not None:
            return conf
        for suffix, conf in self.wild:
            if sni.endswith(suffix) and len(sni) > len(suffix):
                # radixtree_sni.lua: a wildcard covers one more label only
                return conf if "." not in sni[:-len(suffix)] else None
        return self.star
