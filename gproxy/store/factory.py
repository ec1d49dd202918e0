"""Pick the store backend a config asks for: the file (default) or etcd.

APISIX's keys decide: ``deployment.role_<role>.config_provider: etcd`` uses
``deployment.etcd`` (endpoints, prefix, timeouts, ``user``/``password`` and
``tls``); anything else is the standalone YAML file.  Both read private keys
through ``apisix.data_encryption.keyring``.  The etcd backend (and its HTTP
client) is imported only when it is chosen.
"""

from gproxy.store.keyring import Keyring


def etcd_access(cfg):
    """``deployment.etcd``'s TLS and credentials, as one ``EtcdAccess``."""
    from gproxy.store.etcdconn import EtcdAccess
    ca = cfg["apisix.ssl.ssl_trusted_certificate"]
    return EtcdAccess(user=cfg["deployment.etcd.user"],
                      password=cfg["deployment.etcd.password"],
                      verify=cfg["deployment.etcd.tls.verify"],
                      ca=ca if ca in ("", "system") else cfg.file_path(ca),
                      cert=cfg.file_path(cfg["deployment.etcd.tls.cert"]),
                      key=cfg.file_path(cfg["deployment.etcd.tls.key"]),
                      sni=cfg["deployment.etcd.tls.sni"])


def open_store(cfg, standby=False):
    """A ready store for a validated Config (``standby``: a live upgrade's new
    process, which reads it and writes only once it takes over)."""
    keyring = Keyring(cfg["apisix.data_encryption.keyring"])
    if cfg.store_backend == "etcd":
        from gproxy.store.etcd import EtcdStore
        return EtcdStore(cfg["deployment.etcd.host"], cfg["deployment.etcd.prefix"],
                         timeout=cfg["deployment.etcd.timeout"],
                         watch_timeout=cfg["deployment.etcd.watch_timeout"],
                         health_check_timeout=cfg["deployment.etcd.health_check_timeout"],
                         access=etcd_access(cfg), keyring=keyring)
    from gproxy.store.file import FileStore
    return FileStore(cfg.store_path, keyring=keyring, standby=standby)
