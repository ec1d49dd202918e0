"""Packet boundaries found by peeking at headers only: the relay's WALK mode.

A direction that carries runs of large MQTT packets need not read their
bodies to know where they end: ``walk_headers`` asks a ``peek(offset)``
callback (the relay peeks the socket at that offset, SO_PEEK_OFF) for the few
bytes where each packet begins, skips the body by its length, and says how
many bytes have a known structure; the relay moves those with splice(2) and
``Boundaries.advance`` (mqttstream) brings the tracker up to where they
ended.  Pure: the only I/O is what ``peek`` does.
"""

from gproxy.errors import MalformedPacket


def fixed_header(data, start, end):
    """The fixed header at ``data[start:end]``: ``(header size, remaining length)``.

    None when ``data`` ends inside the header; raises MalformedPacket on a
    fifth remaining-length byte (MQTT 5.0 §1.5.5: at most four).
    """
    value, multiplier = 0, 1
    for i in range(start + 1, min(end, start + 5)):
        byte = data[i]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return i + 1 - start, value
        multiplier *= 128
    if end - start >= 5:
        raise MalformedPacket("remaining length longer than four bytes")
    return None


def walk_headers(track, peek, limit, small=0, few=4):
    """Find the packets in the next ``limit`` bytes of a stream by their headers only.

    ``track`` (Boundaries) says where the stream stands; ``peek(offset)``
    returns the bytes waiting at ``offset`` from there (a few, enough for a
    header; b"" when none are there yet).  Body bytes are skipped by length,
    never read.  Returns ``(n, marks)``: the first ``n`` bytes (at most
    ``limit``) have a known structure, and ``marks`` are the headers that
    begin in them, for ``Boundaries.advance`` (which sets ``lost`` once the
    bytes of a header that is not MQTT's have moved).  Stops after ``few`` packets
    smaller than ``small`` bytes: small packets are cheaper to copy than to
    find one peek at a time.  One peek per packet is what this costs, so the
    common case (a peek that starts with a whole header of up to four bytes,
    packets under 2 MiB) is decoded inline, as in ``Boundaries.feed``.
    """
    marks = []
    mark = marks.append
    pos = -len(track.header) if track.header else track.left
    while pos < limit:
        data = peek(pos if pos > 0 else 0)
        if len(data) < 4 or pos < 0:
            return _walk_slowly(track, peek, limit, small, few, marks, pos, data)
        b1 = data[1]
        if b1 < 0x80:
            size = 2 + b1
        else:
            b2 = data[2]
            if b2 < 0x80:
                size = 3 + ((b1 & 0x7F) | (b2 << 7))
            elif data[3] < 0x80:
                size = 4 + ((b1 & 0x7F) | ((b2 & 0x7F) << 7) | (data[3] << 14))
            else:
                return _walk_slowly(track, peek, limit, small, few, marks, pos, data)
        mark((pos, data, size))
        pos += size
        if size < small:
            if size < len(data):  # tiny packets inside this peek: the slow path takes them
                return _walk_slowly(track, peek, limit, small, few - 1, marks, pos,
                                    data[size:])
            few -= 1
            if few < 0:
                break
    return min(pos, limit), marks


def _walk_slowly(track, peek, limit, small, few, marks, pos, data):
    """``walk_headers`` for what its inline case does not take: a header cut short
    or begun in an earlier read, five-byte headers, several packets in one peek."""
    while data:
        if pos < 0:
            data = track.header + data
        end, at = len(data), 0
        while at < end:
            try:
                found = fixed_header(data, at, end)
            except MalformedPacket:  # not MQTT from here: lost once moved past (advance)
                marks.append((pos, data[at:end], 0))
                return pos + end - at, marks
            if found is None:  # a header cut short: take what is there of it
                marks.append((pos, data[at:end], None))
                return pos + end - at, marks
            size = found[0] + found[1]
            marks.append((pos, data[at:at + found[0]], size))
            pos += size
            at += size
            if size < small:
                few -= 1
                if few < 0:
                    return min(pos, limit), marks
            if pos >= limit:
                return limit, marks
        data = peek(pos)
    return max(0, min(pos, limit)), marks
