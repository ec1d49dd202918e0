"""JSON text from outside (Admin API bodies, etcd values), decoded within bounds.

Python's JSON decoder is C, but it holds the hub while it builds every value:
1 MiB of small objects (100,000 values) takes 50 ms.  So a text is counted
before it is decoded (three C scans for ``,``, ``[`` and ``{``, which bound
the values it can hold) and refused above ``MAX_VALUES``; nesting beyond
``MAX_DEPTH`` is refused too (lua-cjson, which APISIX uses, stops at 1,000;
gproxy's checks, copies and renderers recurse, and no object of APISIX's
schemas nests deeper than ten).  Every other text decodes as ``json.loads``
would.  ``JsonError`` carries the reason in lua-cjson's style.  Pure.
"""

import json

#: At most this many JSON values in one text: an upstream of 1,000 nodes in the
#: array form (APISIX's schemas give 1,000 nodes 7,000 values) fits twice.
MAX_VALUES = 16384
MAX_DEPTH = 64


class JsonError(ValueError):
    """A JSON text that cannot be decoded (or not within the bounds); ``str()`` says why."""


def _message(exc):
    """A JSONDecodeError worded like lua-cjson, which APISIX users see."""
    pos = exc.pos + 1
    if exc.msg.startswith("Expecting value"):
        return "Expected value but found invalid token at character %d" % pos
    if exc.msg.startswith("Expecting property name"):
        return "Expected object key string but found invalid token at character %d" % pos
    if exc.msg.startswith("Extra data"):
        return "Expected the end but found invalid token at character %d" % pos
    return "%s at character %d" % (exc.msg, pos)


def _too_deep(value, limit):
    """Whether containers in ``value`` nest more than ``limit`` deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return False


def _none():
    pass


def loads(text, max_values=MAX_VALUES, max_depth=MAX_DEPTH, pause=_none):
    """``json.loads(text)`` for a text within the bounds, else JsonError; ``pause()``
    between the passes over a long text."""
    opening = text.count("[") + text.count("{")
    if opening + text.count(",") + 1 > max_values:  # at least the values it can hold
        raise JsonError("Found too many values (more than %d)" % max_values)
    pause()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonError(_message(exc)) from None
    except RecursionError:
        raise JsonError("Found too many nested data structures (more than %d)"
                        % max_depth) from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise JsonError(str(exc).split(";")[0]) from None
    if opening > max_depth and isinstance(value, (dict, list)) and _too_deep(value, max_depth):
        raise JsonError("Found too many nested data structures (more than %d)" % max_depth)
    return value


def dumps_string(text, pause, every=65536, **options):
    """``json.dumps(text)`` for a long string, ``every`` characters at a time (JSON
    escapes each character on its own, so the parts join into the same text)."""
    if len(text) <= every:
        return json.dumps(text, **options)
    parts = ['"']
    for start in range(0, len(text), every):
        parts.append(json.dumps(text[start:start + every], **options)[1:-1])
        pause()
    parts.append('"')
    return "".join(parts)


def dumps_long(message, pause, field="list", every=128, **options):
    """``json.dumps(message, **options)`` for a message with a long list under
    ``field``: the items are encoded ``every`` at a time with ``pause()`` in
    between, so a caller on the hub never holds it for the whole list."""
    items = message.get(field) if isinstance(message, dict) else None
    if not isinstance(items, list) or len(items) <= every:
        return json.dumps(message, **options)
    head = json.dumps({k: v for k, v in message.items() if k != field}, **options)
    item_sep = options.get("separators", (", ", ": "))[0]
    parts = [head[:-1], item_sep if len(head) > 2 else "",
             json.dumps(field, **options), options.get("separators", (", ", ": "))[1], "["]
    for start in range(0, len(items), every):
        if start:
            parts.append(item_sep)
            pause()
        parts.append(json.dumps(items[start:start + every], **options)[1:-1])
    parts.append("]}")
    return "".join(parts)
