"""A host program that embeds gproxy and obeys commands on stdin (test_embedded_life.py).

    python embed_host.py MODE BROKER_PORT PROXY_PORT STORE_PATH [--from-thread]

Starts gproxy (from a thread that ends at once with ``--from-thread``), adds a
route to the broker, prints ``{"ready": ...}`` and then one JSON line per
command read from stdin:

    stats       proxy.stats(), or the error's type name
    fork        os.fork(): the child reports what its inherited handle does, then
                sleeps until killed; prints {"forked": pid, ...} from the child
    fork-exit   os.fork() and the child exits at once (reaped); {"forked_exit": status}
    grandchild  a ``sleep`` that holds a copy of the handle's channel; {"grandchild": pid}
    stop        proxy.stop(); {"stopped": true}
    exit        sys.exit(0) without calling stop (atexit)
    _exit       os._exit(0): no atexit, no cleanup
"""

import json
import os
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gproxy  # noqa: E402

HOST = "127.0.0.1"


def say(**items):
    sys.stdout.write(json.dumps(items) + "\n")
    sys.stdout.flush()


def error_name(func):
    try:
        func()
    except Exception as exc:
        return type(exc).__name__
    return None


def start(mode, broker_port, port, store, from_thread):
    conf = {"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]},
                       "enable_control": False},
            "plugin_attr": {"prometheus": {"enable_export_server": False}},
            "deployment": {"admin": False}, "gproxy": {"store": {"path": store}}}
    if not from_thread:
        return gproxy.start(conf, mode=mode)
    box = []
    thread = threading.Thread(target=lambda: box.append(gproxy.start(conf, mode=mode)))
    thread.start()
    thread.join()  # the thread that started it is gone from here on
    return box[0]


def forked_child(proxy):
    """In the forked child: the inherited handle refuses, stop does nothing."""
    call = error_name(proxy.stats)
    stop = error_name(proxy.stop)
    say(forked=os.getpid(), call=call, stop=stop)
    threading.Event().wait(120)
    os._exit(0)


def main(mode, broker_port, port, store, from_thread=False):
    proxy = start(mode, int(broker_port), int(port), store, from_thread)
    proxy.routes.put("1", {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT",
                                                      "protocol_level": 4}},
                           "upstream": {"type": "roundrobin",
                                        "nodes": {"%s:%s" % (HOST, broker_port): 1}}})
    child = getattr(proxy, "_child", None)  # process mode: the child and its channel
    channel = child.channel if child is not None else None
    say(ready=True, child=getattr(proxy, "pid", None), host=os.getpid(),
        channel_fd=channel.sock.fileno() if channel else None)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            say(stats=error_name(proxy.stats) or proxy.stats()["live_sessions"])
        elif command == "fork":
            if os.fork() == 0:
                forked_child(proxy)
        elif command == "fork-exit":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            say(forked_exit=os.waitpid(pid, 0)[1])
        elif command == "grandchild":
            holder = subprocess.Popen(["sleep", "60"], pass_fds=(channel.sock.fileno(),))
            say(grandchild=holder.pid)
        elif command == "stop":
            proxy.stop()
            say(stopped=True)
        elif command == "exit":
            sys.exit(0)
        elif command == "_exit":
            os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:5], from_thread="--from-thread" in sys.argv)
