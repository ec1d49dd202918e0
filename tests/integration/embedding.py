"""Helpers for the embedding tests: host configs, and processes and listeners seen
from the outside, in /proc (never by signalling anything)."""

import os

from bench import procstat
from tests.integration.conftest import HOST, free_port
from tests.integration.helpers import Paho

ADMIN_KEY = "edd1c9f034335f136f87ad84b625c8f1"


def write_conf(tmp_path, broker_port, admin=True):
    """A config file with one stream listener, a store holding an mqtt-proxy route
    to the broker, and the Admin API (when ``admin``) on a free port.  No control
    API or metrics listener: their fixed ports would clash between tests."""
    port, admin_port = free_port(), free_port()
    admin_conf = ("  admin:\n    admin_listen:\n      ip: %s\n      port: %d\n" % (HOST, admin_port)
                  if admin else "  admin: false\n")
    path = tmp_path / "config.yaml"
    path.write_text("apisix:\n  enable_control: false\n  stream_proxy:\n    tcp:\n"
                    "      - \"%s:%d\"\n" % (HOST, port) + "deployment:\n" + admin_conf +
                    "plugin_attr:\n  prometheus:\n    enable_export_server: false\n"
                    "gproxy:\n  store:\n    path: apisix.yaml\n")
    (tmp_path / "apisix.yaml").write_text(
        "stream_routes:\n  - id: 1\n    plugins:\n      mqtt-proxy:\n"
        "        protocol_name: MQTT\n        protocol_level: 4\n"
        "    upstream:\n      type: roundrobin\n      nodes:\n"
        "        - host: %s\n          port: %d\n          weight: 1\n#END\n" % (HOST, broker_port))
    return str(path), port, (admin_port if admin else None)


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root):
    """Every live process below ``root`` (not ``root`` itself)."""
    return [pid for pid in procstat.descendants(root) if pid != root]


def is_gproxy_child(pid):
    """True if ``pid`` is the process behind ``gproxy.start(mode="process")``."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return b"--embedded-by" in fh.read()
    except OSError:
        return False


def embedded_below(root):
    """The embedded gproxy processes below ``root``, not their own --workers."""
    found = [pid for pid in descendants(root) if is_gproxy_child(pid)]
    return [pid for pid in found if parent_of(pid) not in found]


def gone(pid):
    """True once ``pid`` has exited (a zombie counts: it runs nothing, holds nothing)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def listener_holders(port):
    """The pids holding the socket that LISTENs on ``port``."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as fh:
            for row in fh.read().splitlines()[1:]:
                f = row.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add("socket:[%s]" % f[9])
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) in inodes:
                    holders.add(int(pid))
            except OSError:
                continue
    return holders


def relays(port, tag):
    """A subscriber and a publisher through the proxy: True if the message arrived."""
    with Paho("sub-" + tag, port) as sub, Paho("pub-" + tag, port) as pub:
        sub.subscribe("t/" + tag, qos=1)
        pub.publish("t/" + tag, tag.encode(), qos=1)
        return sub.expect_message().payload == tag.encode()
