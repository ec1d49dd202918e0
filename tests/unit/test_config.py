"""gproxy.config against docs/apisix-behaviour.md §6-7 and STYLE.md habit 10.

Config files are APISIX-shaped YAML; the plugin doc's snippet (seed 000) must
load as pasted.  A bad value raises ConfigError whose message starts with the
key, and the CLI turns it into exit status 2 with one line on stderr (checked
in a child process, since ``gproxy.cli.main`` monkey-patches; ``--check``
opens no sockets).
"""

import logging
import pathlib
import subprocess
import sys
import textwrap

import pytest

from gproxy.config import DEFAULT_ADMIN_KEY, Config, ListenerSpec, load
from gproxy.errors import ConfigError

TCP = "apisix.stream_proxy.tcp"
ROOT = pathlib.Path(__file__).resolve().parents[2]

# The snippet from the mqtt-proxy plugin doc, under its `apisix:` parent.
SEED_SNIPPET = """\
apisix:
  router:
    http: 'radixtree_uri'
    ssl: 'radixtree_sni'
  stream_proxy: # TCP/UDP proxy
    only: false # needed if HTTP and Stream Proxy should be enabled
    tcp: # TCP proxy port list
      - 9100
  dns_resolver:
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def tcp(*entries):
    return {"apisix": {"stream_proxy": {"tcp": list(entries)}}}


def addrs(cfg):
    return [(spec.addr, spec.optional) for spec in cfg[TCP]]


def config_error(raw):
    with pytest.raises(ConfigError) as info:
        Config(raw)
    return str(info.value)


# -- the seed snippet and defaults ---------------------------------------------------

def test_seed_snippet_loads(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gproxy.config"):
        cfg = load(write(tmp_path, SEED_SNIPPET))
    assert addrs(cfg) == [("0.0.0.0:9100", False), ("[::]:9100", True)]
    assert cfg["apisix.stream_proxy.only"] is False
    assert not caplog.records  # APISIX keys gproxy ignores are not "unknown"


def test_shipped_config_loads():
    cfg = load(str(ROOT / "conf" / "config.yaml"))
    assert ("0.0.0.0:9100", False) in addrs(cfg)


def test_defaults():
    cfg = Config({})
    assert cfg["deployment.admin.admin_listen.ip"] == "127.0.0.1"
    assert cfg["deployment.admin.admin_listen.port"] == 9080
    assert cfg["deployment.admin.admin_key"] == [
        {"name": "admin", "key": DEFAULT_ADMIN_KEY, "role": "admin"}]
    assert DEFAULT_ADMIN_KEY == "edd1c9f034335f136f87ad84b625c8f1"
    assert cfg["deployment.admin.admin_key_required"] is True
    assert cfg["gproxy.preread.timeout"] == 30
    assert cfg["gproxy.preread.buffer_size"] == 16384
    assert addrs(cfg) == [("0.0.0.0:9100", False), ("[::]:9100", True)]


def test_missing_path_means_defaults():
    assert load(None)[TCP] == Config({})[TCP]


# -- stream mode (§6: "stream mode is disabled"; §7 proxy_mode) -------------------------

def test_no_config_file_keeps_the_stream_proxy_on():
    # gproxy's own choice: run with built-in defaults, it proxies on 9100
    assert load(None).stream_enabled is True
    assert Config().stream_enabled is True


def test_shipped_config_and_the_seed_snippet_enable_stream(tmp_path):
    assert load(str(ROOT / "conf" / "config.yaml")).stream_enabled is True
    assert load(write(tmp_path, SEED_SNIPPET)).stream_enabled is True


@pytest.mark.parametrize("text", [
    "",                                                     # an empty file
    "nginx_config:\n  error_log_level: info\n",            # no apisix section
    "apisix:\n  enable_admin: true\n",                      # apisix without stream_proxy
    "apisix:\n  stream_proxy:\n",                           # stream_proxy: null
    "apisix:\n  proxy_mode: stream\n",                      # a mode, but no listeners given
])
def test_a_config_file_without_stream_proxy_disables_stream(tmp_path, text):
    # APISIX <= 3.4: the Admin API and the listeners need apisix.stream_proxy
    assert load(write(tmp_path, text)).stream_enabled is False


@pytest.mark.parametrize("mode, enabled", [("http", False), ("stream", True),
                                           ("http&stream", True)])
def test_proxy_mode(tmp_path, mode, enabled):
    # APISIX 3.5+: proxy_mode http turns stream off even with stream_proxy
    text = SEED_SNIPPET + "  proxy_mode: %s\n" % ("'%s'" % mode)
    assert load(write(tmp_path, text)).stream_enabled is enabled
    assert Config(dict(tcp(9100), apisix=dict(tcp(9100)["apisix"], proxy_mode=mode))
                  ).stream_enabled is enabled


def test_a_config_mapping_is_a_config_file():
    # Config(raw) is what load() builds from a file: the same rule holds
    assert Config({}).stream_enabled is False
    assert Config(tcp(9100)).stream_enabled is True


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "apisix: [\n"))


# -- listeners (§7 apisix.stream_proxy.tcp) -------------------------------------------

def test_listener_forms():
    cfg = Config(tcp("127.0.0.1:9101", "[::1]:9102", {"addr": 9103, "tls": False},
                     {"addr": "127.0.0.1:9104"}))
    assert addrs(cfg) == [("127.0.0.1:9101", False), ("[::1]:9102", False),
                          ("0.0.0.0:9103", False), ("[::]:9103", True),
                          ("127.0.0.1:9104", False)]
    assert all(spec.tls is False for spec in cfg[TCP])


def test_port_ranges():
    cfg = Config(tcp("2000-2002", "127.0.0.1:4000-4001"))
    assert [s.addr for s in cfg[TCP]] == ["0.0.0.0:2000", "0.0.0.0:2001", "0.0.0.0:2002",
                                          "127.0.0.1:4000", "127.0.0.1:4001"]


def test_listener_spec():
    assert ListenerSpec("::1", 1883).addr == "[::1]:1883"
    assert ListenerSpec("10.0.0.1", 1883).addr == "10.0.0.1:1883"


def test_tls_and_proxy_protocol_listeners():
    cfg = Config(tcp(9100, {"addr": "127.0.0.1:8883", "tls": True},
                     {"addr": "127.0.0.1:9101", "proxy_protocol": True,
                      "proxy_protocol_to_upstream": True}))
    specs = {s.addr: s for s in cfg[TCP]}
    assert specs["127.0.0.1:8883"].tls is True
    assert specs["127.0.0.1:8883"].proxy_protocol is None  # the global default decides
    assert specs["127.0.0.1:9101"].proxy_protocol is True
    assert specs["127.0.0.1:9101"].proxy_protocol_to_upstream is True
    assert specs["0.0.0.0:9100"].tls is False


@pytest.mark.parametrize("item", [{"addr": 8883, "tls": "yes"},
                                  {"addr": 8883, "proxy_protocol": 1},
                                  {"addr": 8883, "ssl": True}])
def test_bad_listener_flags(item):
    assert config_error(tcp(9100, item)).startswith("apisix.stream_proxy.tcp[1]")


def test_https_admin_needs_a_certificate_and_key():
    msg = config_error({"deployment": {"admin": {"https_admin": True}}})
    assert "missing ssl cert for https admin" in msg
    cfg = Config({"deployment": {"admin": {"https_admin": True, "admin_api_mtls": {
        "admin_ssl_cert": "admin.crt", "admin_ssl_cert_key": "admin.key"}}}},
        path="/etc/gproxy/config.yaml")
    assert cfg.admin_file("deployment.admin.admin_api_mtls.admin_ssl_cert") == \
        "/etc/gproxy/admin.crt"
    assert cfg.admin_file("deployment.admin.admin_api_mtls.admin_ssl_ca_cert") is None


def test_https_admin_keeps_the_default_key_refusal():
    msg = config_error({"deployment": {"admin": {
        "https_admin": True, "admin_listen": {"ip": "0.0.0.0", "port": 9180},
        "admin_api_mtls": {"admin_ssl_cert": "a.crt", "admin_ssl_cert_key": "a.key"}}}})
    assert "default admin key" in msg


@pytest.mark.parametrize("raw,key", [
    ({"gproxy": {"proxy_protocol": {"upstream_version": 3}}},
     "gproxy.proxy_protocol.upstream_version"),
    ({"apisix": {"ssl": {"fallback_sni": 5}}}, "apisix.ssl.fallback_sni"),
    ({"gproxy": {"tls": {"handshake_timeout": 0}}}, "gproxy.tls.handshake_timeout"),
])
def test_tls_settings_checked(raw, key):
    assert config_error(raw).startswith(key)


@pytest.mark.parametrize("raw,key", [
    (tcp(70000), "apisix.stream_proxy.tcp[0]"),
    (tcp(0), "apisix.stream_proxy.tcp[0]"),
    (tcp(9100, True), "apisix.stream_proxy.tcp[1]"),
    (tcp("foo:9100"), "apisix.stream_proxy.tcp[0]"),
    (tcp("127.0.0.1:x"), "apisix.stream_proxy.tcp[0]"),
    (tcp("3000-2000"), "apisix.stream_proxy.tcp[0]"),
    (tcp({"port": 9100}), "apisix.stream_proxy.tcp[0]"),
    (tcp(), "apisix.stream_proxy.tcp"),
    (tcp(9100, 9100), "apisix.stream_proxy.tcp"),
    ({"apisix": {"stream_proxy": {"tcp": "9100"}}}, "apisix.stream_proxy.tcp"),
    ({"apisix": {"stream_proxy": {"only": "no"}}}, "apisix.stream_proxy.only"),
    ({"apisix": {"proxy_mode": "udp"}}, "apisix.proxy_mode"),
    ({"gproxy": {"preread": {"timeout": "x"}}}, "gproxy.preread.timeout"),
    ({"gproxy": {"preread": {"timeout": 0}}}, "gproxy.preread.timeout"),
    ({"gproxy": {"preread": {"timeout": -1.5}}}, "gproxy.preread.timeout"),
    ({"gproxy": {"preread": {"timeout": True}}}, "gproxy.preread.timeout"),
    ({"gproxy": {"preread": {"buffer_size": 8}}}, "gproxy.preread.buffer_size"),
    ({"gproxy": {"max_connections": 1.5}}, "gproxy.max_connections"),
    ({"gproxy": {"store": {"backend": "etcd"}}}, "gproxy.store.backend"),
    ({"gproxy": {"balancer": {"chash_ring": "maglev"}}}, "gproxy.balancer.chash_ring"),
    ({"nginx_config": {"error_log_level": "loud"}}, "nginx_config.error_log_level"),
    ({"deployment": {"admin": {"admin_listen": {"port": "x"}}}},
     "deployment.admin.admin_listen.port"),
    ({"deployment": {"admin": {"admin_listen": {"ip": "localhost"}}}},
     "deployment.admin.admin_listen.ip"),
    ({"deployment": {"admin": {"allow_admin": ["not-a-cidr"]}}},
     "deployment.admin.allow_admin"),
    ({"deployment": {"admin": {"admin_key": [{"name": "a", "key": 1}]}}},
     "deployment.admin.admin_key[0]"),
    ({"deployment": {"admin": {"admin_key": [{"key": "k", "role": "root"}]}}},
     "deployment.admin.admin_key[0]"),
    ({"deployment": {"admin": {"admin_key_required": "yes"}}},
     "deployment.admin.admin_key_required"),
])
def test_bad_value_names_the_key(raw, key):
    msg = config_error(raw)
    assert msg.startswith(key + ":"), msg


@pytest.mark.parametrize("raw,key", [
    ({"apisix": {"stream_proxy": 9100}}, "apisix.stream_proxy"),
    ({"gproxy": {"preread": 5}}, "gproxy.preread"),
])
def test_scalar_for_a_section_names_the_key(raw, key):
    assert config_error(raw).startswith(key)


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError):
        Config([1, 2])


# -- unknown keys -----------------------------------------------------------------------

def test_unknown_keys_warn_but_load(caplog):
    with caplog.at_level(logging.WARNING, logger="gproxy.config"):
        cfg = Config({"gproxy": {"prereed": {"timeout": 5}, "preread": {"timeout": 5}},
                      "frobnicate": True})
    assert cfg["gproxy.preread.timeout"] == 5
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "gproxy.prereed.timeout" in warned and "frobnicate" in warned


def test_apisix_keys_are_accepted(caplog):
    raw = {"apisix": {"node_listen": [9080], "enable_admin": True},
           "deployment": {"role": "traditional", "etcd": {"host": ["http://127.0.0.1:2379"]},
                          "admin": {"admin_api_version": "v3"}},
           "stream_plugins": ["mqtt-proxy"], "plugins": ["limit-conn"]}
    with caplog.at_level(logging.WARNING, logger="gproxy.config"):
        Config(raw)
    assert not caplog.records


# -- the admin key on a public address (§6 default keys) -----------------------------

def test_default_key_on_a_public_admin_address():
    msg = config_error({"deployment": {"admin": {"admin_listen": {"ip": "0.0.0.0"}}}})
    assert msg.startswith("deployment.admin.admin_key")
    assert "admin_key" in msg and "key:" in msg  # says how to set one


def test_own_key_on_a_public_admin_address():
    keys = [{"name": "admin", "key": "a-long-random-key", "role": "admin"}]
    cfg = Config({"deployment": {"admin": {"admin_listen": {"ip": "0.0.0.0", "port": 9180},
                                           "admin_key": keys}}})
    assert cfg["deployment.admin.admin_listen.port"] == 9180
    assert cfg["deployment.admin.admin_key"] == keys


def test_default_key_on_loopback_is_fine():
    assert Config({"deployment": {"admin": {"admin_listen": {"ip": "::1"}}}})


# -- ${{VAR}} substitution (§7) ----------------------------------------------------------

def test_env_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("GPROXY_TEST_PORT", "9123")
    monkeypatch.setenv("GPROXY_TEST_KEY", "k-from-env")
    monkeypatch.delenv("GPROXY_TEST_UNSET", raising=False)
    cfg = load(write(tmp_path, """\
        apisix:
          stream_proxy:
            tcp:
              - ${{GPROXY_TEST_PORT}}
              - "127.0.0.1:${{ GPROXY_TEST_UNSET:=9124 }}"
        deployment:
          admin:
            admin_key:
              - name: admin
                key: ${{GPROXY_TEST_KEY}}
                role: admin
        gproxy:
          preread:
            timeout: ${{GPROXY_TEST_UNSET:=12.5}}
        """))
    assert [s.addr for s in cfg[TCP]] == ["0.0.0.0:9123", "[::]:9123", "127.0.0.1:9124"]
    assert cfg["deployment.admin.admin_key"][0]["key"] == "k-from-env"
    assert cfg["gproxy.preread.timeout"] == 12.5


def test_env_default_is_overridden_by_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("GPROXY_TEST_TIMEOUT", "3")
    cfg = load(write(tmp_path, "gproxy:\n  preread:\n    timeout: ${{GPROXY_TEST_TIMEOUT:=9}}\n"))
    assert cfg["gproxy.preread.timeout"] == 3


def test_env_variable_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("GPROXY_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="GPROXY_TEST_UNSET"):
        load(write(tmp_path, "gproxy:\n  preread:\n    timeout: ${{GPROXY_TEST_UNSET}}\n"))


def test_store_path_is_relative_to_the_config_file(tmp_path):
    cfg = load(write(tmp_path, "gproxy:\n  store:\n    path: data/routes.yaml\n"))
    assert cfg.store_path == str(tmp_path / "data" / "routes.yaml")


# -- the CLI ------------------------------------------------------------------------------

def run_check(path):
    return subprocess.run([sys.executable, "-m", "gproxy", "-c", str(path), "--check"],
                          capture_output=True, text=True, timeout=60, cwd=str(path.parent))


def test_cli_exits_2_naming_the_key(tmp_path):
    proc = run_check(write(tmp_path, "gproxy:\n  preread:\n    timeout: soon\n"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "gproxy.preread.timeout" in lines[0]


def test_cli_check_accepts_the_seed_snippet(tmp_path):
    proc = run_check(write(tmp_path, SEED_SNIPPET))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "apisix.yaml").exists()  # --check writes nothing


# -- store selection and embedding switches (issue 17) ---------------------------

def test_the_file_store_is_the_default():
    assert Config().store_backend == "file"
    assert Config({"deployment": {"role": "traditional"}}).store_backend == "file"


def test_apisix_keys_select_etcd():
    cfg = Config(yaml_load("""
        deployment:
          role: traditional
          role_traditional: {config_provider: etcd}
          etcd: {host: ["http://127.0.0.1:2379/"], prefix: /apisix, timeout: 30}
        """))
    assert cfg.store_backend == "etcd"
    assert cfg["deployment.etcd.host"] == ["http://127.0.0.1:2379"]
    assert cfg["deployment.etcd.prefix"] == "/apisix"
    data_plane = Config({"deployment": {"role": "data_plane",
                                        "role_data_plane": {"config_provider": "etcd"}}})
    assert data_plane.store_backend == "etcd"


@pytest.mark.parametrize("raw, key", [
    ({"deployment": {"etcd": {"host": ["127.0.0.1:2379"]}}}, "deployment.etcd.host"),
    ({"deployment": {"etcd": {"host": []}}}, "deployment.etcd.host"),
    ({"deployment": {"etcd": {"prefix": "apisix"}}}, "deployment.etcd.prefix"),
    ({"deployment": {"etcd": {"timeout": 0}}}, "deployment.etcd.timeout"),
    ({"deployment": {"role_traditional": {"config_provider": "consul"}}},
     "deployment.role_traditional.config_provider"),
    ({"deployment": {"role": "control_plane"}}, "deployment.role"),
])
def test_bad_etcd_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        Config(raw)


def test_deployment_admin_false_turns_the_admin_api_off():
    cfg = Config({"deployment": {"admin": False}, "apisix": {"stream_proxy": {"tcp": [9100]}}})
    assert cfg["apisix.enable_admin"] is False
    assert cfg["apisix.stream_proxy.tcp"][0].port == 9100
    assert Config({"apisix": {"enable_admin": False}})["apisix.enable_admin"] is False
    assert Config()["apisix.enable_admin"] is True


def yaml_load(text):
    import yaml
    return yaml.safe_load(textwrap.dedent(text))


# -- SIGHUP: what a reload applies and what takes a restart ------------------------------

def test_a_reload_names_every_changed_key_it_cannot_apply():
    """``deployment.etcd.*`` and ``config_provider`` need a new store: a reload
    must say so instead of reporting them applied."""
    from gproxy.runtime.reload import needs_restart
    old = Config({"deployment": {"etcd": {"host": ["http://127.0.0.1:2379"]}}})
    new = Config({"deployment": {"role_traditional": {"config_provider": "etcd"},
                                 "etcd": {"host": ["http://127.0.0.2:2379"], "prefix": "/x",
                                          "timeout": 5}},
                  "gproxy": {"admin": {"timeout": 3, "request_timeout": 2},
                             "proxy": {"timeout": 60}}})
    assert needs_restart(old, new) == [
        "deployment.role_traditional.config_provider", "deployment.etcd.host",
        "deployment.etcd.prefix", "deployment.etcd.timeout"]


def test_every_key_a_reload_applies_is_declared():
    from gproxy.config.keys import SETTINGS
    from gproxy.runtime.reload import LIVE
    assert LIVE <= {key for key, *_ in SETTINGS}
