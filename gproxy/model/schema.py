"""A small JSON-schema checker that words its errors like APISIX's jsonschema.lua.

APISIX users grep for and script against the Admin API's ``error_msg``
strings, so gproxy validates stream routes and upstreams against APISIX's own
schemas (docs/apisix-behaviour.md §3, §4.1, §5.1) and reports the first
failure with api7/jsonschema's wording: ``property "x" validation failed:
wrong type: expected integer, got string``.  Only the keywords those schemas
use are implemented, plus ``propertyNames`` with a schema for an object's
keys (JSON Schema draft 6; jsonschema.lua has no message for it, so gproxy's
follows its style).  Pure: no I/O, imports nothing from gproxy but errors.

Every check takes time linear in the value, whatever its content: patterns
run on RE2 (``google-re2``), never on a backtracking engine, and unique
items are found by hashing, not by comparing every pair.  APISIX matches
with PCRE (``ngx.re.find(s, p, "jo")``: bytes, no Unicode classes), so each
pattern is translated once into RE2 with the same meaning: Latin-1 over the
value's UTF-8 bytes, ``$`` also before a final newline, ``\\s`` with the
vertical tab.  Error messages quote the pattern as APISIX wrote it.
"""

import functools

import re2

from gproxy.errors import SchemaError

EVERY = 64  # items of one array or object checked between two pauses
_SPACE = "\\t\\n\\x0b\\f\\r "  # PCRE's \\s (RE2's has no vertical tab)
_OUTSIDE = {"$": "(?:\\n?$)", "\\s": "[" + _SPACE + "]", "\\S": "[^" + _SPACE + "]"}


def pcre_to_re2(pattern):
    """RE2 syntax for a PCRE pattern as APISIX's schemas use one (same matches).

    Only what those patterns need: ``$`` (PCRE: end, or before a final
    newline) and ``\\s``/``\\S`` outside character classes; anything else is
    the same in both.
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        pair = pattern[i:i + 2]
        if char == "\\":
            out.append(_OUTSIDE.get(pair, pair) if not in_class else pair)
            if in_class and pair in ("\\s", "\\S"):
                raise ValueError("\\s in a character class: %r" % pattern)
            i += 2
            continue
        if in_class:
            in_class = char != "]" or pattern[i - 1] == "["
        elif char == "[":
            in_class = True
        out.append(_OUTSIDE.get(char, char) if not in_class and char == "$" else char)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=None)
def compiled(pattern):
    """The RE2 program for one of the schemas' patterns (compiled once)."""
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1  # bytes, as PCRE without "u"
    options.never_capture = True
    options.log_errors = False
    return re2.compile(pcre_to_re2(pattern).encode("latin-1"), options)


def matches(pattern, text):
    """PCRE's ``find(text, pattern)`` for a schema pattern, in linear time."""
    return compiled(pattern).search(text.encode("utf-8", "surrogatepass")) is not None


def _lua_type(value):
    """The Lua type name jsonschema.lua reports for a decoded JSON value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (dict, list)):
        return "table"
    return "userdata"  # JSON null (cjson.null)


def _is_type(value, name):
    if name == "object":
        return isinstance(value, dict) or value == []
    if name == "array":
        return isinstance(value, list)
    if name == "integer":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and float(value).is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    raise ValueError("schema uses unknown type %r" % name)


def _lua_str(value):
    """Lua's ``%q`` for the strings jsonschema.lua quotes."""
    return '"%s"' % str(value).replace("\\", "\\\\").replace('"', '\\"')


def _num(value):
    return str(int(value)) if float(value).is_integer() else repr(value)


def validate(schema, value, pause=None):
    """Return the first error message for ``value``, or ``None`` if it is valid.

    ``pause()`` is called every ``EVERY`` items of an array or object: a caller
    on the hub lets the data path run while 1,000 nodes are checked."""
    kind = schema.get("type")
    if isinstance(kind, str) and not _is_type(value, kind):
        return "wrong type: expected %s, got %s" % (kind, _lua_type(value))
    if isinstance(kind, list) and not any(_is_type(value, k) for k in kind):
        return "wrong type: expected one of %s, got %s" % (", ".join(kind), _lua_type(value))
    for check in (_check_object, _check_array, _check_string, _check_number,
                  _check_enum, _check_any_of, _check_one_of):
        err = check(schema, value, pause)
        if err:
            return err
    return None


def _check_object(schema, value, pause=None):
    if not isinstance(value, dict):
        return None
    props = schema.get("properties", {})
    required = list(schema.get("required", ()))
    for name, sub in props.items():
        if name in value:
            err = validate(sub, value[name], pause)
            if err:
                return "property %s validation failed: %s" % (_lua_str(name), err)
        elif name in required:
            return "property %s is required" % _lua_str(name)
    for name in required:
        if name not in value:
            return "property %s is required" % _lua_str(name)
    err = _check_names(schema, value)
    if err:
        return err
    patterns = schema.get("patternProperties", {})
    extra = schema.get("additionalProperties", True)
    for n, (name, item) in enumerate(value.items(), 1):
        if pause is not None and n % EVERY == 0:
            pause()
        matched = False
        for patt, sub in patterns.items():
            if matches(patt, name):
                matched = True
                err = validate(sub, item, pause)
                if err:
                    return "failed to validate %s (matching %s): %s" % (name, _lua_str(patt), err)
        if extra is False and name not in props and not matched:
            return "additional properties forbidden, found %s" % name
    if len(value) < schema.get("minProperties", 0):
        return "expect object to have at least %s properties" % schema["minProperties"]
    return None


def _check_names(schema, value, pause=None):
    """``maxProperties`` (before the properties are walked) and ``propertyNames``."""
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        return "expect object to have at most %s properties" % schema["maxProperties"]
    names = schema.get("propertyNames")
    if names:
        for name in value:
            err = validate(names, name)
            if err:
                return "property name %s validation failed: %s" % (_lua_str(name[:64]), err)
    return None


def _check_array(schema, value, pause=None):
    if not isinstance(value, list):
        return None
    if len(value) < schema.get("minItems", 0):
        return "expect array to have at least %s items" % schema["minItems"]
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        return "expect array to have at most %s items" % schema["maxItems"]
    if "items" in schema:
        for i, item in enumerate(value, 1):
            if pause is not None and i % EVERY == 0:
                pause()
            err = validate(schema["items"], item, pause)
            if err:
                return "failed to validate item %d: %s" % (i, err)
    if schema.get("uniqueItems"):
        pair = _equal_pair(value)
        if pair:
            return "expected unique items but items %d and %d are equal" % pair
    return None


def _canon(value):
    """A hashable stand-in for a JSON value, equal where Lua's deep equality is:
    ``1`` and ``1.0`` are equal, ``true`` and ``1`` are not, ``[]`` and ``{}``
    are the same empty table."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, dict):
        return ("t", frozenset((k, _canon(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("t", frozenset((i, _canon(v)) for i, v in enumerate(value, 1)))
    return ("v", value)


def _equal_pair(items):
    """jsonschema.lua's ``unique_item_in_array`` answer in linear time: the first
    repeated scalar (``(first, repeat)``, 1-based), else the first pair of
    equal tables, else None."""
    seen, tables = {}, {}
    for i, item in enumerate(items, 1):
        if isinstance(item, (dict, list)):
            tables.setdefault(_canon(item), []).append(i)
        elif _canon(item) in seen:
            return seen[_canon(item)], i
        else:
            seen[_canon(item)] = i
    repeated = [group[:2] for group in tables.values() if len(group) > 1]
    return tuple(min(repeated)) if repeated else None


def _check_string(schema, value, pause=None):
    if not isinstance(value, str):
        return None
    if "minLength" in schema and len(value) < schema["minLength"]:
        return "string too short, expected at least %d, got %d" % (schema["minLength"], len(value))
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return "string too long, expected at most %d, got %d" % (schema["maxLength"], len(value))
    if "pattern" in schema and not matches(schema["pattern"], value):
        return "failed to match pattern %s with %s" % (_lua_str(schema["pattern"]), _lua_str(value))
    return None


def _check_number(schema, value, pause=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if "minimum" in schema and value < schema["minimum"]:
        return "expected %s to be greater than %s" % (_num(value), _num(schema["minimum"]))
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        return "expected %s to be sctrictly greater than %s" % (
            _num(value), _num(schema["exclusiveMinimum"]))  # sic, jsonschema.lua
    if "maximum" in schema and value > schema["maximum"]:
        return "expected %s to be smaller than %s" % (_num(value), _num(schema["maximum"]))
    return None


def _check_enum(schema, value, pause=None):
    if "enum" in schema and value not in schema["enum"]:
        return "matches non of the enum values"  # sic, jsonschema.lua
    return None


def _check_any_of(schema, value, pause=None):
    subs = schema.get("anyOf")
    if not subs or any(validate(sub, value, pause) is None for sub in subs):
        return None
    requireds = [sub["required"] for sub in subs if "required" in sub]
    msg = "object matches none of the requireds"
    if requireds:
        msg += ": " + " or ".join(
            "[%s]" % ",".join('"%s"' % r for r in req) for req in requireds)
    return msg


def _check_one_of(schema, value, pause=None):
    subs = schema.get("oneOf")
    if not subs:
        return None
    matched = [i for i, sub in enumerate(subs, 1) if validate(sub, value, pause) is None]
    if not matched:
        return "value should match only one schema, but matches none"
    if len(matched) > 1:
        return "value should match only one schema, but matches both schemas %d and %d" % tuple(
            matched[:2])
    return None


def check(schema, value, prefix="invalid configuration: ", pause=None):
    """Raise SchemaError(prefix + first error) unless ``value`` fits ``schema``."""
    err = validate(schema, value, pause)
    if err:
        raise SchemaError(prefix + err)
