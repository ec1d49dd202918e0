"""Text from the wire, made safe for one log line.

A client chooses its client id, username and protocol name; written to a log
as they are, a ``\\n`` in one of them would forge a second log line.  Pure.
"""

_SURROGATES = range(0xDC80, 0xDD00)  # undecodable bytes under surrogateescape


def printable(value):
    """``value`` (bytes or str) with every non-printable character escaped.

    Backslashes are doubled so an escape can never be forged either; bytes that
    are not UTF-8 appear as ``\\xNN``.  Printable text comes back unchanged.
    """
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code in _SURROGATES:
            out.append("\\x%02x" % (code - 0xDC00))
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x100:
            out.append("\\x%02x" % code)
        else:
            out.append("\\u%04x" % code if code < 0x10000 else "\\U%08x" % code)
    return "".join(out)
