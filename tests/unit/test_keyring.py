"""APISIX's encryption of private keys at rest (``apisix.data_encryption.keyring``).

The expected ciphertexts come from outside gproxy: two vectors from APISIX's
own test suite (``t/node/data_encrypt.t``, 3.9.0: with the keyring entry
``edd1c9f0985e76a2``, ``bar`` is stored as ``77+NmbYqNfN+oLm0aX5akg==`` and
``vU/ZHVJw7b0XscDJ1Fhtig==`` reads as ``auth-two``), and an encryption the
tests do themselves from the documented algorithm (``tests/apisix_keyring``).
"""

import base64

import pytest

from gproxy.config import Config
from gproxy.errors import ConfigError, SchemaError
from gproxy.store.keyring import Keyring, aes_decrypt, aes_encrypt
from tests.apisix_keyring import DEFAULT_KEYRING, encrypt as apisix_encrypt

DEFAULT = list(DEFAULT_KEYRING)  # APISIX's config-default.yaml
PEM = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
       "-----END PRIVATE KEY-----\n")


def test_apisix_test_suite_vectors():
    assert aes_encrypt(b"edd1c9f0985e76a2", "bar") == "77+NmbYqNfN+oLm0aX5akg=="
    assert aes_decrypt(b"edd1c9f0985e76a2",
                       base64.b64decode("vU/ZHVJw7b0XscDJ1Fhtig==")) == "auth-two"


def test_a_pem_key_is_encrypted_with_the_first_entry_as_apisix_does():
    ring = Keyring(DEFAULT)
    stored = ring.encrypt(PEM)
    assert stored == apisix_encrypt(DEFAULT[0], PEM)
    assert ring.decrypt(stored) == PEM
    # what is not PEM is left alone (already encrypted, or not a key)
    assert ring.encrypt(stored) == stored
    assert ring.decrypt(PEM) == PEM


def test_each_entry_is_tried_in_turn_when_decrypting():
    old = apisix_encrypt("edd1c9f0985e76a1", PEM)
    assert Keyring(["qeddd145sfvddff3", "edd1c9f0985e76a1"]).decrypt(old) == PEM
    with pytest.raises(SchemaError, match="^failed to decrypt previous encrypted key$"):
        Keyring(["qeddd145sfvddff3"]).decrypt(old)
    for junk in ("not base64 !", "QUJD", ""):  # bad base64, not whole blocks
        with pytest.raises(SchemaError, match="failed to decrypt previous encrypted key"):
            Keyring(DEFAULT).decrypt(junk)


def test_aes_256_with_a_32_character_entry():
    entry = "0123456789abcdef0123456789abcdef"
    stored = Keyring([entry]).encrypt(PEM)
    assert stored == apisix_encrypt(entry, PEM)
    assert Keyring([entry]).decrypt(stored) == PEM


def test_no_keyring_stores_keys_as_given():
    for ring in (Keyring(None), Keyring([])):
        assert not ring
        assert ring.encrypt(PEM) == PEM
        assert ring.seal("ssls", {"key": PEM}) == {"key": PEM}
    assert Keyring("edd1c9f0985e76a2").encrypt(PEM) == apisix_encrypt("edd1c9f0985e76a2", PEM)


def test_which_fields_are_sealed_and_opened():
    ring = Keyring(DEFAULT)
    ssl = {"id": "1", "cert": "CERT", "key": PEM, "keys": [PEM, PEM], "snis": ["a.example"]}
    sealed = ring.seal("ssls", ssl)
    assert ssl["key"] == PEM, "the input is not changed"
    assert sealed["key"] == sealed["keys"][0] == apisix_encrypt(DEFAULT[0], PEM)
    assert sealed["cert"] == "CERT" and sealed["snis"] == ["a.example"]
    assert ring.open("ssls", sealed) == ssl
    upstream = {"nodes": {"127.0.0.1:1": 1}, "tls": {"client_cert": "C", "client_key": PEM}}
    assert ring.seal("upstreams", upstream)["tls"] == {
        "client_cert": "C", "client_key": apisix_encrypt(DEFAULT[0], PEM)}
    route = {"upstream": upstream, "plugins": {}}
    assert ring.open("stream_routes", ring.seal("stream_routes", route)) == route
    assert ring.seal("upstreams", {"nodes": {}}) == {"nodes": {}}


def test_config_takes_apisix_keyring_forms():
    assert Config()["apisix.data_encryption.keyring"] == DEFAULT
    assert Config({"apisix": {"data_encryption": {"keyring": None}}})[
        "apisix.data_encryption.keyring"] is None
    assert Config({"apisix": {"data_encryption": {"keyring": "edd1c9f0985e76a1"}}})[
        "apisix.data_encryption.keyring"] == ["edd1c9f0985e76a1"]
    for bad in (["short"], [], "x" * 17, [1]):
        with pytest.raises(ConfigError, match="apisix.data_encryption.keyring"):
            Config({"apisix": {"data_encryption": {"keyring": bad}}})


def test_log_lines_show_no_private_key_of_any_kind():
    from gproxy.model.ssls import redacted
    upstream = {"nodes": {"127.0.0.1:1": 1}, "tls": {"client_cert": "C", "client_key": PEM}}
    assert redacted(upstream) == {"nodes": {"127.0.0.1:1": 1}, "tls": {"client_cert": "C"}}
    route = {"id": "1", "upstream": upstream}
    assert redacted(route)["upstream"]["tls"] == {"client_cert": "C"}
    assert redacted({"cert": "C", "key": PEM, "keys": [PEM]}) == {"cert": "C"}
    assert upstream["tls"]["client_key"] == PEM, "the input is not changed"
