"""One HTTP connection's requests, for the listeners' table of connections.

gevent's ``pywsgi.WSGIHandler`` with each request walked through the states
of ``conns.Conn``: ``waiting`` until a request's first byte, ``reading``
while its line, headers and body arrive (the body is read whole, up to
``max_body`` bytes, before the application runs, so a slow body is a slow
request and not a busy one), ``busy`` while the application runs,
``writing`` while the response goes out, then ``waiting`` again when the
connection is kept alive.

After every read it checks whether the connection was dropped (a deadline,
or room made at the cap): a dropped connection ends quietly, and a request
read only in part never reaches the application.  Timeouts, resets and
malformed requests are counted on the ``Conn`` (``reason``) for the
listener's one-line summary; none of them writes a traceback (pywsgi's own
handler prints one for a client that stalls in its headers).
"""

import io

from gevent import pywsgi
from gevent.pywsgi import MAX_REQUEST_LINE, WSGIHandler

from gproxy.admin.conns import BUSY, READING, WAITING, WRITING

_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_URI_TOO_LONG = b"HTTP/1.1 414 Request-URI Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


#: pywsgi's "bad chunked body" error: an IOError, but the client's fault (400)
_INVALID_INPUT = getattr(pywsgi, "_InvalidClientInput", ())


class Dropped(Exception):
    """The connection was closed under the request (a deadline, or the cap)."""


class _Drained:
    """Stands in for pywsgi's ``Input`` once the body has been read (or refused):
    there is nothing left to discard before the next request."""

    def _discard(self):
        pass


class Handler(WSGIHandler):
    """pywsgi's handler, driven by a ``conns.Conn`` (set as ``conn`` before ``handle``)."""

    conn = None
    max_body = 1024 * 1024

    def handle_one_request(self):
        """``None`` (close), ``True`` (next request) or ``(status, raw response)``."""
        if self.rfile.closed:
            return None
        try:
            line = self._request_line()
            if not line:
                return None
            self.response_length = 0
            if len(line) >= MAX_REQUEST_LINE:
                return self._refuse("414", _URI_TOO_LONG)
            self.requestline = line
            self.read_request(line)
            self._check()
            self.environ = self.get_environ()
            self._buffer_body()
        except Exception as exc:  # noqa: BLE001: every client error is one count, not a trace
            return self._client_error(exc)
        self.conn.enter(BUSY)
        self.application = self.server.application
        self.handle_one_response()
        if self.close_connection or self.rfile.closed or self.conn.dropped:
            return None
        self.conn.enter(WAITING)
        return True

    def _request_line(self):
        """The next request line, or "" when the client is done or the connection dropped."""
        first = self.rfile.peek(1)  # buffered bytes, or one read: the wait for a request
        if not first or self.conn.dropped:
            return ""
        if self.conn.state == WAITING:
            self.conn.enter(READING)
        line = self.rfile.readline(MAX_REQUEST_LINE).decode("latin-1")
        self._check()
        return line

    def _check(self):
        if self.conn.dropped:
            raise Dropped(self.conn.reason)

    def _buffer_body(self):
        """Read the whole body now (within the request's deadline) into memory.

        A body over ``max_body`` is not read: the application sees its length
        and answers 413, and the connection closes after the response.
        """
        env = self.environ
        if env.get("wsgi.input") is self.rfile:  # an Upgrade request: no body to read
            return
        declared = self.content_length or 0
        body = b""
        if declared <= self.max_body:
            body = self.wsgi_input.read(self.max_body + 1)
            self._check()
        size = max(declared, len(body))
        if size > self.max_body:
            body = b""
            self.close_connection = True
        env.pop("HTTP_TRANSFER_ENCODING", None)
        env["CONTENT_LENGTH"] = str(size)
        env["wsgi.input"] = io.BytesIO(body)
        env["wsgi.input_terminated"] = True
        self.wsgi_input = _Drained()

    def process_result(self):
        self.conn.enter(WRITING)
        super().process_result()

    def _refuse(self, status, raw):
        self.conn.reason = self.conn.reason or "bad_request"
        return status, raw

    def _client_error(self, exc):
        """What a failed request read comes to: a quiet close, or a 400."""
        conn = self.conn
        if conn.dropped or isinstance(exc, Dropped):
            return None
        if isinstance(exc, TimeoutError):  # the socket's own timeout, a backstop
            conn.reason = "request_timeout"
            return None
        if isinstance(exc, OSError) and not isinstance(exc, _INVALID_INPUT):
            return None  # the client went away (reset, TLS alert): nothing to say
        return self._refuse("400", _BAD_REQUEST)

    # pywsgi's own reports of a bad request (with a traceback for some): a count instead
    _handle_client_error = _client_error

    def log_error(self, msg, *args):
        if self.conn is not None:
            self.conn.reason = self.conn.reason or "bad_request"
