"""The stream access log: nginx's log_format and escaping, $status, the off-hub writer.

Escaping is checked against nginx's own rules written out here byte by byte
(ngx_stream_log_escape's table and ngx_escape_json), on every byte value.
The writer is checked on a real gevent ThreadPool with a real file: lines
arrive whole, a slow disk makes lines drop (counted, warned) instead of
holding the hub, reopen() follows a rename as logrotate does it.
"""

import logging
import os
import re
import threading
from types import SimpleNamespace

import gevent
import pytest

from gproxy.config import Config
from gproxy.errors import ConfigError, Reject
from gproxy.model.logformat import STREAM_VARIABLES, compile_format, escape
from gproxy.proxy import accesslog
from gproxy.proxy.accesslog import VARIABLES, AccessLog, status
from gproxy.proxy.sessions.registry import Registry


def nginx_default(data):
    out = b""
    for byte in data:
        if byte < 0x20 or byte in (0x22, 0x5C) or byte >= 0x7F:
            out += ("\\x%02X" % byte).encode()
        else:
            out += bytes([byte])
    return out


def nginx_json(data):
    short = {0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t", 0x08: b"\\b", 0x0C: b"\\f"}
    out = b""
    for byte in data:
        if byte in (0x22, 0x5C):
            out += b"\\" + bytes([byte])
        elif byte <= 0x1F:
            out += short.get(byte, ("\\u%04X" % byte).encode())
        else:
            out += bytes([byte])
    return out


def test_escaping_follows_nginx_for_every_byte():
    every = bytes(range(256))
    assert escape(every, "default") == nginx_default(every)
    assert escape(every, "json") == nginx_json(every)
    assert escape(every, "none") == every
    assert escape("é\"x", "default") == b"\\xC3\\xA9\\x22x"
    assert (escape(None, "default"), escape(None, "json")) == (b"-", b"")


def test_formats_compile_and_render_only_values_escaped():
    fmt = compile_format('"$remote_addr" ${status}x [$mqtt_client_id]\n', STREAM_VARIABLES)
    assert fmt.names == ("remote_addr", "status", "mqtt_client_id")
    values = {"remote_addr": "::1", "status": "200", "mqtt_client_id": 'a"b'}
    assert fmt.render(values) == b'"::1" 200x [a\\x22b]'
    with pytest.raises(ValueError, match='unknown "request_uri" variable'):
        compile_format("$request_uri", STREAM_VARIABLES)


def test_every_declared_variable_has_a_value():
    assert set(VARIABLES) == set(STREAM_VARIABLES)


def test_config_checks_the_format_and_escape():
    with pytest.raises(ConfigError, match=r'access_log_format: unknown "nope" variable'):
        Config({"nginx_config": {"stream": {"access_log_format": "$remote_addr $nope"}}})
    with pytest.raises(ConfigError, match="access_log_format_escape"):
        Config({"nginx_config": {"stream": {"access_log_format_escape": "xml"}}})
    cfg = Config({"nginx_config": {"stream": {"enable_access_log": True}}})
    assert cfg["nginx_config.stream.access_log"] == "logs/access_stream.log"
    assert cfg["nginx_config.stream.access_log_format"] == accesslog.DEFAULT_FORMAT


def ended(refusal=None, **info):
    record = Registry(worker=0).new_session(("127.0.0.1", 40000), ("127.0.0.1", 9100))
    record.connected_at -= 1.5
    for key, value in info.items():
        setattr(record, key, value)
    return SimpleNamespace(info=record, refusal=refusal, replay=b"", tried=[], sni=None)


@pytest.mark.parametrize("refusal, code", [
    (None, 200),
    (Reject("ip_restriction", logging.WARNING, "x", status=404), 404),
    (Reject("limit_conn", logging.WARNING, "x"), 503),
    (Reject("protocol_level", logging.WARNING, "x", status=503), 503),
    (Reject("no_route", logging.INFO, "x"), 502),
    (Reject("upstream_unavailable", logging.ERROR, "x"), 502),
    (Reject("proxy_protocol", logging.ERROR, "x"), 400),
    (Reject("tls_handshake", logging.INFO, "x"), 500),
    (Reject("timeout", logging.INFO, "x"), 200),
    (ConnectionResetError(104, "reset"), 500),
])
def test_status_is_nginx_stream_status(refusal, code):
    assert status(ended(refusal)) == code


def test_default_line_of_a_refused_session_that_read_a_connect():
    s = ended(Reject("protocol_level", logging.WARNING, "x", status=503))
    s.replay = b"\x10" * 17
    line = compile_format(accesslog.DEFAULT_FORMAT, STREAM_VARIABLES).render(
        lambda name: VARIABLES[name](s, s.info.connected_at + 1.5))
    assert re.fullmatch(rb"127\.0\.0\.1 \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
                        rb"TCP 503 0 17 1\.500", line), line


def read_lines(path, count, timeout=5.0):
    with gevent.Timeout(timeout):
        while True:
            try:
                with open(path, "rb") as fh:
                    lines = fh.read().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= count:
                return lines
            gevent.sleep(0.01)


def test_lines_are_written_whole_by_the_writer_thread(tmp_path):
    path = str(tmp_path / "logs" / "access.log")
    log = AccessLog(path, "$connection $mqtt_client_id")
    log.check()
    threads = set()
    real = log._write
    log._write = lambda data: (threads.add(threading.get_ident()), real(data))[1]
    for n in range(500):
        log.session(ended(client_id="c%d" % n))
    lines = read_lines(path, 500)
    assert lines == [b"1 c%d" % n for n in range(500)]
    assert threading.get_ident() not in threads  # never written on the hub
    log.close()


def test_a_slow_disk_drops_lines_instead_of_holding_the_hub(tmp_path, caplog):
    path = str(tmp_path / "access.log")
    log = AccessLog(path, "$mqtt_client_id", max_pending=1000)
    stuck = threading.Event()
    real = log._write
    log._write = lambda data: (stuck.wait(10), real(data))[1]
    for n in range(300):  # each line is 6 bytes: ~166 fit while the first write hangs
        log.session(ended(client_id="c%04d" % n))
    assert log.dropped > 100
    assert "lines dropped" in caplog.text
    stuck.set()
    lines = read_lines(path, 300 - log.dropped)
    assert len(lines) == 300 - log.dropped and lines[0] == b"c0000"
    log.close()


def test_reopen_follows_a_rename_as_logrotate_does(tmp_path):
    path = str(tmp_path / "access.log")
    log = AccessLog(path, "$mqtt_client_id")
    log.session(ended(client_id="before"))
    read_lines(path, 1)
    os.rename(path, path + ".1")
    log.session(ended(client_id="still-old"))
    read_lines(path + ".1", 2)  # nginx too writes on to the renamed file until USR1
    log.reopen()
    log.session(ended(client_id="after"))
    assert read_lines(path, 1) == [b"after"]
    log.close()


def test_lines_wait_for_a_full_buffer_or_the_flush_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(accesslog, "FLUSH_EVERY", 0.2)
    log = AccessLog(str(tmp_path / "access.log"), "$mqtt_client_id")
    writes = []
    real = log._write
    log._write = lambda data: (writes.append(data.count(b"\n")), real(data))[1]
    for round_ in range(3):  # each round: lines a few ms apart, then the interval passes
        for n in range(10):
            log.session(ended(client_id="r%d-%d" % (round_, n)))
            gevent.sleep(0.005)
        gevent.sleep(0.4)
    assert writes == [10, 10, 10]  # one batch per interval, not one write per line
    log.session(ended(client_id="x" * (accesslog.BUFFER + 1)))
    gevent.sleep(0.05)
    assert writes == [10, 10, 10, 1]  # a full buffer goes at once
    log.close()
