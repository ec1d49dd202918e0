"""APISIX's encryption of private keys at rest, written here from its documented
algorithm and source (``apisix/ssl.lua``, ``core/data_encryption.lua`` and
lua-resty-string's ``aes.new``), independently of gproxy's code: AES-CBC
with the keyring entry as key and as IV (its first 16 bytes: OpenSSL reads
one block), PKCS#7 padding (done by hand here), standard base64.  The keyring
entries are APISIX 3.x's defaults (``conf/config-default.yaml``)."""

import base64

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

DEFAULT_KEYRING = ("qeddd145sfvddff3", "edd1c9f0985e76a2")


def _cipher(entry):
    secret = entry.encode()
    return Cipher(algorithms.AES(secret), modes.CBC(secret[:16]))


def encrypt(entry, text):
    data = text.encode()
    pad = 16 - len(data) % 16
    enc = _cipher(entry).encryptor()
    return base64.b64encode(enc.update(data + bytes([pad]) * pad) + enc.finalize()).decode()


def decrypt(entry, stored):
    dec = _cipher(entry).decryptor()
    data = dec.update(base64.b64decode(stored)) + dec.finalize()
    pad = data[-1]
    assert 1 <= pad <= 16 and data[-pad:] == bytes([pad]) * pad, "bad padding"
    return data[:-pad].decode()
