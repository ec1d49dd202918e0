"""A real DNS server (Debian's ``dnsmasq``) for the DNS discovery tests.

dnsmasq answers on a free loopback port (UDP and TCP) for the ``test``
domain only (``local=/test/``: other names get NXDOMAIN, nothing is
forwarded), with A/AAAA records from a hosts file the test rewrites
(``set_hosts``, then ``reload()``: SIGHUP makes dnsmasq re-read it) and SRV
and CNAME records from its config (``srv``/``cname`` at construction; a
change needs ``restart()``).  Every record has the TTL ``ttl``.  Started
with ``subprocess.Popen`` and stopped (or killed) by its own PID.
"""

import os
import shutil
import signal
import socket
import subprocess

from tests.integration.conftest import HOST, free_port, stop_process, wait_listening

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def available():
    return os.access(DNSMASQ, os.X_OK)


def _free_udp_too():
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


class Dnsmasq:
    def __init__(self, directory, hosts=(), srv=(), cname=(), ttl=1):
        """``hosts``: ``[(ip, name)]``; ``srv``: ``[(service, target, port, priority, weight)]``;
        ``cname``: ``[(alias, target)]``."""
        self.dir = directory
        self.port = _free_udp_too()
        self.hosts_path = os.path.join(directory, "dns-hosts")
        self.conf_path = os.path.join(directory, "dnsmasq.conf")
        self.log_path = os.path.join(directory, "dnsmasq.log")
        self.set_hosts(hosts)
        lines = ["port=%d" % self.port, "listen-address=%s" % HOST, "bind-interfaces",
                 "no-resolv", "no-hosts", "no-poll", "local=/test/", "pid-file=",
                 "addn-hosts=%s" % self.hosts_path, "local-ttl=%d" % ttl,
                 "log-facility=%s" % self.log_path, "log-queries"]
        if os.geteuid() == 0:
            lines.append("user=root")  # else it drops to nobody, who cannot read our files
        lines += ["srv-host=%s,%s,%d,%d,%d" % entry for entry in srv]
        lines += ["cname=%s,%s" % entry for entry in cname]
        with open(self.conf_path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.proc = None

    @property
    def server(self):
        return "%s:%d" % (HOST, self.port)

    def set_hosts(self, hosts):
        tmp = self.hosts_path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("".join("%s %s\n" % entry for entry in hosts))
        os.replace(tmp, self.hosts_path)

    def start(self):
        self.proc = subprocess.Popen(
            [DNSMASQ, "--keep-in-foreground", "--conf-file=%s" % self.conf_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, what="dnsmasq")  # its TCP side
        return self

    def reload(self):
        """SIGHUP: dnsmasq re-reads the hosts file (and drops its cache)."""
        self.proc.send_signal(signal.SIGHUP)

    def kill(self):
        """SIGKILL, as a crash: no goodbye to anyone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""
