"""APISIX's standalone YAML layout: the text of the store file, both ways.

``parse(text)`` checks the ``#END`` flag and every item (an item that fails its
check is reported in APISIX's words and left out, as APISIX standalone does);
``render(...)`` writes the file gproxy keeps.  Pure: text in, data out.
"""

import json

import yaml

from gproxy.errors import SchemaError
from gproxy.model.ssls import redacted
from gproxy.store.base import KINDS, check_item

END_FLAG = "#END"
HEADER = ("# gproxy store: stream routes and upstreams, APISIX standalone layout.\n"
          "# Written by the Admin API; hand edits are picked up within a second or two\n"
          "# (keep the #END line last); an edit that fails to load is logged and ignored.\n")


def has_end_flag(text):
    """APISIX looks for ``#END`` in the file's last bytes, after trailing space."""
    return text.rstrip()[-len(END_FLAG):] == END_FLAG


def parse(text, path, require_end=True, keyring=None):
    """Parse and check a store file's text (private keys given encrypted with
    APISIX's ``keyring`` are decrypted first, as APISIX standalone reads them).

    Returns ``({kind: [value, ...]}, [error line, ...], revision)``; raises
    SchemaError when the file as a whole is unusable.
    """
    if require_end and not has_end_flag(text):
        raise SchemaError("missing valid end flag in file %s" % path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SchemaError("%s is not valid YAML: %s" % (path, exc)) from None
    if not isinstance(data, dict):
        raise SchemaError("%s: expected a mapping with stream_routes and upstreams" % path)
    out, errors = {}, []
    for kind in KINDS:
        items = data.get(kind) or []
        if not isinstance(items, list):
            raise SchemaError("%s: %s must be a list" % (path, kind))
        out[kind] = []
        for value in items:
            try:
                if keyring is not None:
                    value = keyring.open(kind, value)
                check_item(kind, value)
            except SchemaError as exc:
                shown = redacted(value) if isinstance(value, dict) else value
                errors.append("failed to check item data of [%s] err:%s ,val: %s"
                              % (kind, exc, json.dumps(shown, default=str)))
                continue
            out[kind].append(value)  # the id keeps its type; the store key is str(id)
    return out, errors, int(data.get("gproxy_revision") or 0)


def render(values, revision):
    """The file for ``{kind: [value, ...]}``: routes first, as APISIX's examples."""
    doc = {kind: values.get(kind, []) for kind in ("stream_routes", "upstreams")}
    if values.get("ssls"):  # APISIX standalone's top-level ``ssls`` (private keys included)
        doc["ssls"] = values["ssls"]
    doc["gproxy_revision"] = revision
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return HEADER + body + END_FLAG + "\n"
