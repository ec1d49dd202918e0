"""Pick the store backend a config asks for: the file (default) or etcd.

APISIX's keys decide: ``deployment.role_<role>.config_provider: etcd`` uses
``deployment.etcd``; anything else is the standalone YAML file.  The etcd
backend (and its HTTP client) is imported only when it is chosen.
"""


def open_store(cfg):
    """A ready store for a validated Config."""
    if cfg.store_backend == "etcd":
        from gproxy.store.etcd import EtcdStore
        return EtcdStore(cfg["deployment.etcd.host"], cfg["deployment.etcd.prefix"],
                         timeout=cfg["deployment.etcd.timeout"],
                         watch_timeout=cfg["deployment.etcd.watch_timeout"],
                         health_check_timeout=cfg["deployment.etcd.health_check_timeout"])
    from gproxy.store.file import FileStore
    return FileStore(cfg.store_path)
