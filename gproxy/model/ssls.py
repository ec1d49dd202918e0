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
import re

from gproxy.errors import SchemaError
from gproxy.model.resources import HOST_PATTERN, ID_SCHEMA
from gproxy.model.schema import check

_LABELS = {"type": "object", "patternProperties": {
    ".*": {"type": "string", "pattern": r"^\S+$", "minLength": 1, "maxLength": 256}}}
CERT = {"type": "string", "minLength": 128, "maxLength": 64 * 1024}
KEY = {"type": "string", "minLength": 64, "maxLength": 64 * 1024}
_SNI = {"type": "string", "pattern": r"^\*$|" + HOST_PATTERN}
SSL_SCHEMA = {
    "type": "object",
    "properties": {
        "id": ID_SCHEMA,
        "desc": {"type": "string", "maxLength": 256},
        "labels": _LABELS,
        "create_time": {"type": "integer"},
        "update_time": {"type": "integer"},
        "type": {"type": "string", "enum": ["server", "client"]},
        "cert": CERT,
        "key": KEY,
        "sni": _SNI,
        "snis": {"type": "array", "items": _SNI, "minItems": 1},
        "certs": {"type": "array", "items": CERT},
        "keys": {"type": "array", "items": KEY},
        "client": {"type": "object", "properties": {
            "ca": CERT,
            "depth": {"type": "integer", "minimum": 0},
            "skip_mtls_uri_regex": {"type": "array", "minItems": 1, "uniqueItems": True,
                                    "items": {"type": "string"}},
        }, "required": ["ca"]},
        "status": {"type": "integer", "enum": [1, 0]},
        "ssl_protocols": {"type": "array", "maxItems": 3, "uniqueItems": True,
                          "items": {"enum": ["TLSv1.1", "TLSv1.2", "TLSv1.3"]}},
    },
    "additionalProperties": False,
}
#: Fields that hold private keys: never in an Admin API answer or a log line.
SECRET_FIELDS = ("key", "keys")

_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\s*([A-Za-z0-9+/=\s]*?)\s*-----END \1-----")
_KEY_LABELS = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY")


def pem_blocks(text, labels):
    """The DER bytes of each PEM block of ``text`` whose label is in ``labels``."""
    out = []
    for label, body in _PEM.findall(text):
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


def check_ssl(conf):
    """Raise SchemaError with APISIX's message unless ``conf`` is a valid ssl object."""
    check(SSL_SCHEMA, conf)
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
