"""The process: where the data path, the store and the Admin API meet.

Owns: ``Gproxy`` (``app``: listeners + store + Admin API + store watcher),
``--workers`` (``workers``: forking; ``channel``: the control channel;
``merged``: the parent's merged view of the workers' sessions).  The only
package that imports ``gproxy.proxy``, ``gproxy.store`` and ``gproxy.admin``
together.  Patches nothing and installs no signal handlers.
"""
