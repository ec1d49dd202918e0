"""A stand-in for the new gproxy in a live upgrade, for the failure tests.

Started by a real gproxy (``gproxy.upgrade.command``) with the upgrade socket in
``$GPROXY_UPGRADE_FD``, it speaks the handover protocol from its own, independent
code (length-prefixed JSON, descriptors by SCM_RIGHTS) and then misbehaves as
``argv[1]`` says:

    format        say hello with a handover format no gproxy writes (99)
    die-mid-way   say hello, take the listeners, say ready, take the sessions'
                  descriptors and then their state (quiesced in the old process),
                  then die (exit 3) before the commit
    silent        say nothing (the old process times out waiting)
"""

import json
import os
import socket
import struct
import sys
import time


def send(sock, message):
    data = json.dumps(dict(message, fds=0)).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv(sock):
    buf, fds = b"", []
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
        data, got, _, _ = socket.recv_fds(sock, 1 << 18, 253)
        if not data:
            raise SystemExit("the old process closed the socket")
        buf += data
        fds += got
    size = struct.unpack("!I", buf[:4])[0]
    return json.loads(buf[4:4 + size]), fds


def main(mode):
    sock = socket.socket(fileno=int(os.environ["GPROXY_UPGRADE_FD"]))
    with open(os.environ["FAKE_SUCCESSOR_LOG"], "a") as log:
        log.write("started %s %d\n" % (mode, os.getpid()))
    if mode == "silent":
        time.sleep(120)
        return 0
    send(sock, {"op": "hello", "format": 99 if mode == "format" else 1, "pid": os.getpid(),
                "version": "fake"})
    message, fds = recv(sock)
    if mode == "format":
        assert message["op"] == "abort", message
        return 0
    assert message["op"] == "listeners" and fds, message
    send(sock, {"op": "ready"})
    while True:  # the descriptors go ahead ("stage"), then the quiesced sessions
        message, fds = recv(sock)
        with open(os.environ["FAKE_SUCCESSOR_LOG"], "a") as log:
            log.write("got %s with %d descriptors\n" % (message["op"], len(fds)))
        if message["op"] == "staged":
            send(sock, {"op": "staged"})
        if message["op"] == "sessions":
            os._exit(3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
