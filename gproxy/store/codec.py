"""APISIX's standalone YAML layout: the text of the store file, both ways.

gproxy writes each item on one line, as JSON, which YAML reads as a flow
mapping (APISIX's lyaml reads it too)::

    stream_routes:
    - {"id":"1","server_port":1985,"upstream_id":"1",...}
    upstreams:
    - {"id":"1","nodes":{"127.0.0.1:1995":1},...}
    gproxy_revision: 12
    #END

Rendering one item is one ``json.dumps``, so the file is built from texts kept
per item; reading a file in that layout takes one JSON decode per line.  Any
other file (a hand edit in block YAML) is read as YAML, with the JSON number
forms (``1e-05``) as numbers, as lyaml reads them.  ``parse(text)`` checks the
``#END`` flag and every item (an item that fails its check is reported in
APISIX's words and left out, as APISIX standalone does).  Pure: text in, data
out; ``pause`` is the caller's, called between items.
"""

import json
import re

import yaml

from gproxy.errors import SchemaError
from gproxy.model.ssls import redacted
from gproxy.store.base import KINDS, check_item

END_FLAG = "#END"
HEADER = ("# gproxy store: stream routes and upstreams, APISIX standalone layout, one item a\n"
          "# line (JSON). Hand edits are picked up within a second or two (keep the #END\n"
          "# line last); an edit that fails to load is logged and ignored.\n")
ORDER = ("stream_routes", "upstreams", "ssls")  # as APISIX's examples: routes first
#: Characters JSON leaves as they are but YAML reads otherwise (line breaks,
#: non-printable ones) or refuses: written as \u escapes, which both read.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")
_TOP = re.compile(r"^([a-z_]+):(?: (\[\]|\d+))?$")
EVERY = 16  # items between two calls to pause() (which yields once a millisecond)


def has_end_flag(text):
    """APISIX looks for ``#END`` in the file's last bytes, after trailing space
    (``text``: str or bytes; only its tail is looked at)."""
    tail = text[-4096:].rstrip()
    flag = END_FLAG.encode() if isinstance(tail, bytes) else END_FLAG
    return tail[-len(flag):] == flag


def item_text(value):
    """One item as the store file holds it: JSON that YAML reads the same way."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if text.isascii() and "\x7f" not in text:
        return text
    return _YAML_UNSAFE.sub(lambda m: "\\u%04x" % ord(m.group()), text)


def render_parts(texts, revision, pause=None):
    """The file's text in parts, from ``{kind: [item_text, ...]}``."""
    parts = [HEADER]
    for kind in ORDER:
        items = texts.get(kind) or ()
        if kind == "ssls" and not items:
            continue  # APISIX standalone's top-level ``ssls`` only when there are some
        parts.append("%s:%s\n" % (kind, "" if items else " []"))
        for start in range(0, len(items), EVERY * 64):
            parts.extend("- %s\n" % text for text in items[start:start + EVERY * 64])
            if pause is not None:
                pause()
    parts.append("gproxy_revision: %d\n%s\n" % (revision, END_FLAG))
    return parts


def render(values, revision):
    """The file for ``{kind: [value, ...]}``."""
    texts = {kind: [item_text(v) for v in values.get(kind) or ()] for kind in KINDS}
    return "".join(render_parts(texts, revision))


def json_layout(text, pause=None):
    """``(items, revision)`` for a file in gproxy's own layout, else None.

    ``text`` may be the file's bytes: each item line then goes to the JSON
    decoder as it is, and only the short lines between them are decoded here.
    """
    pause = pause or _none
    items, revision, kind = {kind: [] for kind in KINDS}, 0, None
    lines = _byte_lines(text) if isinstance(text, bytes) else text.splitlines()
    item = b"- {" if isinstance(text, bytes) else "- {"
    for n, line in enumerate(lines):
        if line.startswith(item) and kind is not None:
            try:
                items[kind].append(json.loads(line[2:]))
            except ValueError:
                return None
            if n % EVERY == 0:
                pause()
            continue
        if isinstance(line, bytes):
            line = line.rstrip(b"\r").decode("utf-8", "replace")
        if not line or line.startswith("#"):
            continue
        top = _TOP.match(line)
        if top is None:
            return None
        name, rest = top.groups()
        if name == "gproxy_revision" and rest and rest.isdigit():
            revision, kind = int(rest), None
        elif name in KINDS and rest in (None, "[]"):
            kind = name if rest is None else None
        else:
            return None
    return items, revision


def _byte_lines(data):
    """The lines of ``data`` one at a time (splitting megabytes at once is one long step)."""
    pos = 0
    while pos <= len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        yield data[pos:end]
        pos = end + 1


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML, with JSON's number forms as numbers (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-0123456789"))


def yaml_layout(text, path):
    """``(items, revision)`` of any YAML file in APISIX's layout; SchemaError if it is not one."""
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise SchemaError("%s is not valid YAML: %s" % (path, exc)) from None
    if not isinstance(data, dict):
        raise SchemaError("%s: expected a mapping with stream_routes and upstreams" % path)
    items = {}
    for kind in KINDS:
        items[kind] = data.get(kind) or []
        if not isinstance(items[kind], list):
            raise SchemaError("%s: %s must be a list" % (path, kind))
    return items, int(data.get("gproxy_revision") or 0)


def _none():
    pass


def check_items(items, pause=None, keyring=None):
    """The items that pass APISIX's checks, and a line in APISIX's words for each
    that does not: ``({kind: [value, ...]}, [error line, ...])``.  Private keys
    given encrypted with APISIX's ``keyring`` are decrypted first, as APISIX
    standalone reads them."""
    pause = pause or _none
    out, errors = {}, []
    for kind in KINDS:
        out[kind] = []
        for n, value in enumerate(items[kind]):
            if n % EVERY == 0:
                pause()
            try:
                if keyring is not None:
                    value = keyring.open(kind, value)
                check_item(kind, value, pause)
            except SchemaError as exc:
                shown = redacted(value) if isinstance(value, dict) else value
                errors.append("failed to check item data of [%s] err:%s ,val: %s"
                              % (kind, exc, json.dumps(shown, default=str)))
                continue
            out[kind].append(value)  # the id keeps its type; the store key is str(id)
    return out, errors


def parse(text, path, require_end=True, keyring=None):
    """Parse and check a store file's text (blocking: no pauses).

    Returns ``({kind: [value, ...]}, [error line, ...], revision)``; raises
    SchemaError when the file as a whole is unusable.
    """
    if require_end and not has_end_flag(text):
        raise SchemaError("missing valid end flag in file %s" % path)
    items, revision = json_layout(text) or yaml_layout(text, path)
    out, errors = check_items(items, keyring=keyring)
    return out, errors, revision
