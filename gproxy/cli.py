"""``gproxy`` command line: the only place that patches, reads argv and installs signals.

Signals (gunicorn's model: handlers only set flags, the main greenlet acts):
SIGTERM or SIGINT drains (``Gproxy.stop``: stop accepting, end sessions
cleanly within ``gproxy.shutdown.grace``); a second one forces.  SIGHUP
re-reads the config file and applies it (``Gproxy.reload_config``); a file
that does not load is logged and the running configuration kept.  SIGUSR1
reopens the stream access log (logrotate's ``postrotate``), as nginx does.
SIGUSR2 is a live upgrade (``runtime.upgrade``): the gproxy now on disk
takes every listener and session, and this process exits.
"""

import argparse
import logging
import os
import resource
import sys
import time

DEFAULT_CONFIG = os.path.join("conf", "config.yaml")
#: nginx level names -> logging levels
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO,
          "warn": logging.WARNING, "error": logging.ERROR, "crit": logging.CRITICAL,
          "alert": logging.CRITICAL, "emerg": logging.CRITICAL}
NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
         logging.ERROR: "error", logging.CRITICAL: "crit"}


class NginxFormatter(logging.Formatter):
    """``2026/11/25 14:00:00 [info] 4242#0: message``, the layout APISIX users grep."""

    def format(self, record):
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(record.created))
        line = "%s [%s] %d#0: %s" % (stamp, NAMES.get(record.levelno, "info"),
                                     record.process, record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(NginxFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


def parse_args(argv):
    from gproxy import __version__
    parser = argparse.ArgumentParser(
        prog="gproxy", description="MQTT-aware TCP proxy compatible with APISIX's "
        "stream proxy and mqtt-proxy plugin.")
    parser.add_argument("-c", "--config", default=None,
                        help="APISIX-shaped config file (default: %s if present, else "
                        "built-in defaults)" % DEFAULT_CONFIG)
    parser.add_argument("--log-level", choices=sorted(LEVELS, key=LEVELS.get),
                        help="override nginx_config.error_log_level")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="proxy processes sharing the listeners with SO_REUSEPORT "
                        "(default 1; use the number of cores for the most connections/s)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and store, then exit")
    parser.add_argument("--version", action="version", version="gproxy " + __version__)
    # The child behind gproxy.start(mode="process"): not for the command line.
    parser.add_argument("--embedded-by", type=int, metavar="PID", help=argparse.SUPPRESS)
    parser.add_argument("--channel-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def raise_fd_limit(want=262144):
    """Allow many sockets (two per session): up to ``want`` if we may, else the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):  # not root: the hard limit is as far as we can go
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from gevent import monkey
    monkey.patch_all()  # gunicorn-style: this process is a gevent program end to end
    if args.embedded_by is not None:
        return embedded(args)

    from gproxy import config
    from gproxy.errors import ConfigError, SchemaError
    from gproxy.runtime import sdnotify, upgrade
    from gproxy.runtime.app import Gproxy

    wire = upgrade.inherited_wire()  # started by a live upgrade (SIGUSR2)

    setup_logging(args.log_level or "warn")
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        print("gproxy: invalid config: %s" % exc, file=sys.stderr)
        return 2
    setup_logging(args.log_level or cfg["nginx_config.error_log_level"])
    try:
        app = Gproxy(cfg, standby=wire is not None)  # a successor writes once it takes over
    except (OSError, SchemaError, ValueError) as exc:
        print("gproxy: cannot load the store: %s" % exc, file=sys.stderr)
        return 2
    if args.check:
        print("gproxy: config %s and store %s are valid" % (path or "(defaults)", cfg.store_path))
        return 0
    raise_fd_limit()
    signals = install_signals()  # before listening: a SIGHUP must never find the default
    workers = max(args.workers, 1)
    if wire is not None:
        if not take_over(app, wire, workers):
            return 1
    else:
        try:
            app.start(workers=workers)
        except OSError as exc:
            print("gproxy: %s" % exc, file=sys.stderr)
            return 1
        sdnotify.notify("READY=1")
    freeze_startup_objects(app)  # (sessions taken over included: they have no cycles)
    if os.environ.get("GPROXY_HUB_PROBE"):  # a diagnostic: how long the hub is held
        from gproxy import hubprobe
        hubprobe.start(os.environ["GPROXY_HUB_PROBE"])
    serve(app, signals, lambda: reload(app, path, args.log_level), app.reopen_logs,
          upgrade.Upgrader(app, command()))
    app.store.close()  # the file store folds its journal into the file
    return 0


def command():
    """How this process was started, for a live upgrade to start the program on disk now."""
    if getattr(sys, "frozen", False):  # the one-file executable
        return [sys.executable] + sys.argv[1:]
    return [sys.executable] + list(getattr(sys, "orig_argv", sys.argv)[1:])


def take_over(app, wire, workers):
    """Started by a live upgrade: take the old process's listeners and sessions.
    False (this process stops; the old one kept everything) if it fails."""
    from gproxy.runtime import upgrade
    from gproxy.runtime.handover import HandoverError
    log = logging.getLogger("gproxy.upgrade")
    try:
        moved = upgrade.take_over(app, wire, workers)
    except (HandoverError, OSError) as exc:
        log.error("upgrade: %s; the old process keeps serving, this one stops", exc)
        app.stop()  # drains the few sessions it accepted meanwhile
        return False
    log.warning("upgrade: took over from the old process%s",
                "" if moved is None else ": %d sessions" % moved)
    return True


def embedded(args):
    """The process behind ``gproxy.start(mode="process")`` (runtime.embed.child):
    the host's signals stay the host's; it stops us over the channel."""
    import signal
    from gproxy.runtime.embed import child
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the host, which stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not child.die_with(args.embedded_by):
        return 1  # the host is already gone
    raise_fd_limit()
    return child.run(args.channel_fd, args.embedded_by, freeze_startup_objects)


def freeze_startup_objects(app):
    """Keep start-up's objects, then each live session, out of every later garbage
    collection (runtime/gcpolicy.py).  This process's own business only (the
    command, its workers, the child of ``mode="process"``): never done when gproxy
    is embedded in a host's own process (``mode="thread"``)."""
    from gproxy.runtime import gcpolicy
    gcpolicy.start(live=lambda: len(app.registry))


def reload(app, path, log_level):
    """SIGHUP: re-read the config; a file that does not load changes nothing."""
    from gproxy import config
    from gproxy.errors import ConfigError
    log = logging.getLogger("gproxy")
    log.warning("reload: reading %s", path or "(defaults)")
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        log.error("reload: %s; keeping the running configuration", exc)
        return
    app.reload_config(cfg, log_level)


def install_signals():
    """SIGTERM/SIGINT and SIGHUP handlers that only set flags; returns (flags, wake)."""
    import gevent
    import gevent.event
    import signal
    wake = gevent.event.Event()
    flags = {"stop": 0, "reload": 0, "reopen": 0, "upgrade": 0}

    def flag(name):  # signal handlers only set flags; the main greenlet does the work
        def handler():
            flags[name] += 1
            wake.set()
        return handler

    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, flag("stop"))
    gevent.signal_handler(signal.SIGHUP, flag("reload"))
    gevent.signal_handler(signal.SIGUSR1, flag("reopen"))
    gevent.signal_handler(signal.SIGUSR2, flag("upgrade"))  # nginx's binary upgrade signal
    return flags, wake


def serve(app, signals, on_reload, on_reopen=lambda: None, upgrader=None):
    """Run until SIGTERM/SIGINT has drained the app (a second one forces), or a
    live upgrade (SIGUSR2) handed everything over and what was left drained."""
    import gevent
    flags, wake = signals

    def upgraded(run):
        if run.value:  # everything that could move did: drain the rest and exit
            flags["stop"] += 1
        wake.set()

    wake.set()  # a signal may have come while starting
    log = logging.getLogger("gproxy")
    drain = None
    while drain is None or not drain.ready():
        wake.wait()
        wake.clear()
        if not any(flags.values()) and drain is None:
            continue
        if flags["reload"] and drain is None:
            flags["reload"] = 0
            on_reload()
        if flags["reopen"]:
            flags["reopen"] = 0
            on_reopen()
        if flags["upgrade"] and drain is None:
            flags["upgrade"] = 0
            run = upgrader.request() if upgrader is not None else None
            if run is not None:
                run.link(upgraded)
        if flags["stop"] and drain is None:
            log.warning("shutting down (a second SIGTERM or SIGINT forces)")
            drain = gevent.spawn(app.stop)
            drain.link(lambda _: wake.set())
        elif flags["stop"] > 1:
            log.warning("shutting down now: closing every session")
            drain.kill()
            app.stop(0)
            break
