"""gproxy: an MQTT-aware TCP proxy compatible with Apache APISIX's stream proxy.

Importing the package patches nothing and starts nothing; ``gproxy.cli`` is
the only module that monkey-patches.  In a synchronous program,
``gproxy.start(config)`` runs gproxy in a child process the handle owns, or
with ``mode="thread"`` in a background thread on its own gevent hub
(``gproxy.runtime.embed``, imported on first use so ``import gproxy`` stays
cheap); a gevent program can also run ``gproxy.runtime.app.Gproxy`` itself.
"""

__version__ = "0.1.0"
_LAZY = ("start", "AdminError", "EmbeddedProxy", "ProxyStopped", "HandoverError")


def __getattr__(name):
    if name in _LAZY:
        # Imported by name on first use: every gproxy module imports this package
        # (for __version__), and none of them may pull in the runtime with it.
        import importlib
        return getattr(importlib.import_module("gproxy.runtime.embed"), name)
    raise AttributeError("module 'gproxy' has no attribute %r" % name)
