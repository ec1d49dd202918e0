"""Where stream routes, upstreams and ssls are kept.

Owns: the ``Store`` interface (``base``), APISIX's standalone YAML layout
(``codec``), the embedded file backend (``file``) with its journal (``journal``)
and atomic file replacement (``atomic``), and the etcd backend (``etcd``).
Must not import the data path (``gproxy.proxy``), the Admin API or the runtime:
the runtime hands a store to whoever needs one.
"""

from gproxy.store.base import KINDS, Record, Store  # noqa: F401
