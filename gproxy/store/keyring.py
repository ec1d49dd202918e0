"""Private keys at rest, as APISIX keeps them: ``apisix.data_encryption.keyring``.

APISIX 3.x encrypts the private keys of ``ssls`` objects (``key`` and each of
``keys``) and of upstreams (``tls.client_key``, inline route upstreams too)
before it writes them to etcd, whenever the keyring is not empty (it is not,
by default); ``keyring: null`` stores them as given.  The algorithm is
``apisix/ssl.lua`` / ``core/data_encryption.lua`` with lua-resty-string's
``aes:new(key, nil, cipher, {iv = key})``: AES-CBC with the keyring entry
itself as both key and IV (16 bytes: AES-128; 32 bytes: AES-256, APISIX
3.18+, whose IV is the entry's first 16 bytes: OpenSSL reads one block), PKCS#7 padding, standard base64 with padding.  Only a value that
starts with ``---`` (PEM) is encrypted, with the first entry; only a value
that does not is decrypted, with each entry in turn.  (A wrong entry
usually fails the padding check; gproxy also requires the result to be PEM,
so one that pads by chance is not taken for the key.)

``seal(kind, value)`` is what is written to etcd, ``open(kind, value)`` what
a value read from it (or from a store file) holds; both return copies.  A key
that cannot be decrypted raises SchemaError with APISIX's
``failed to decrypt previous encrypted key``.  No key material is ever put
into an error message.  Pure: no I/O.
"""

import base64
import binascii
import copy

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gproxy.errors import SchemaError

DECRYPT_FAILED = "failed to decrypt previous encrypted key"
PEM_PREFIX = "---"


def _cipher(secret):
    # OpenSSL's CBC reads one block of the IV buffer: a 32-byte entry's first 16 bytes
    return Cipher(algorithms.AES(secret), modes.CBC(secret[:16]))


def aes_encrypt(secret, text):
    """lua-resty-string's ``aes:new(secret, nil, cbc, {iv = secret}):encrypt`` in base64."""
    padder = padding.PKCS7(128).padder()
    data = padder.update(text.encode()) + padder.finalize()
    enc = _cipher(secret).encryptor()
    return base64.b64encode(enc.update(data) + enc.finalize()).decode()


def aes_decrypt(secret, raw):
    """The text of ``raw`` (ciphertext bytes) under ``secret``, or None (bad padding)."""
    dec = _cipher(secret).decryptor()
    data = dec.update(raw) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return (unpadder.update(data) + unpadder.finalize()).decode()
    except (ValueError, UnicodeDecodeError):
        return None


class Keyring:
    """The configured keyring (a list of 16- or 32-byte strings, a string, or None:
    ``apisix.data_encryption.keyring``, whose default is APISIX's)."""

    def __init__(self, entries):
        if isinstance(entries, str):
            entries = [entries]
        self.secrets = [e.encode() for e in entries or () if len(e.encode()) in (16, 32)]

    def __bool__(self):
        return bool(self.secrets)

    # -- one value ---------------------------------------------------------------
    def encrypt(self, text):
        """``text`` as APISIX stores it: a PEM value encrypted with the first entry."""
        if not self.secrets or not text.startswith(PEM_PREFIX):
            return text
        return aes_encrypt(self.secrets[0], text)

    def decrypt(self, text):
        """The PEM text of a stored value; SchemaError when no entry decrypts it."""
        if not self.secrets or text.startswith(PEM_PREFIX):
            return text
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SchemaError(DECRYPT_FAILED) from None
        if not raw or len(raw) % 16:
            raise SchemaError(DECRYPT_FAILED)
        for secret in self.secrets:
            found = aes_decrypt(secret, raw)
            if found is not None and found.startswith(PEM_PREFIX):
                return found
        raise SchemaError(DECRYPT_FAILED)

    # -- a stored object ------------------------------------------------------------
    def seal(self, kind, value):
        """A copy of ``value`` with its private keys encrypted (what goes to etcd)."""
        return _each_key(kind, value, self.encrypt) if self.secrets else value

    def open(self, kind, value):
        """A copy of ``value`` with its private keys decrypted; SchemaError if one fails."""
        return _each_key(kind, value, self.decrypt) if self.secrets else value



def _each_key(kind, value, change):
    """Apply ``change`` to every private key field of an object of ``kind``."""
    if not isinstance(value, dict):
        return value
    if kind == "ssls":
        out = dict(value)
        if isinstance(out.get("key"), str):
            out["key"] = change(out["key"])
        if isinstance(out.get("keys"), list):
            out["keys"] = [change(k) if isinstance(k, str) else k for k in out["keys"]]
        return out
    if kind == "upstreams":
        return _upstream(value, change)
    if kind == "stream_routes" and isinstance(value.get("upstream"), dict):
        return dict(value, upstream=_upstream(value["upstream"], change))
    return value


def _upstream(upstream, change):
    tls = upstream.get("tls")
    if not isinstance(tls, dict) or not isinstance(tls.get("client_key"), str):
        return upstream
    out = copy.copy(upstream)
    out["tls"] = dict(tls, client_key=change(tls["client_key"]))
    return out
