"""gproxy: an MQTT-aware TCP proxy compatible with Apache APISIX's stream proxy.

Importing the package patches nothing and starts nothing; ``gproxy.cli`` is
the only module that monkey-patches.  Embed with ``gproxy.runtime.app.Gproxy``.
"""

__version__ = "0.1.0"
