"""The comparison operators of lua-resty-expr v1, as gproxy evaluates them (``expr``).

Each operator builds, from the rule's right value, a test of one variable's
value (bytes, None when unset), with ``resty/expr/v1.lua``'s semantics: Lua's
``tonumber`` for numeric comparisons, string equality otherwise, RE2 for
``~~``/``~*``, Python's ``ipaddress`` for ``ipmatch`` (what
``resty.ipmatcher`` accepts, minus its quiet readings of bad masks).  A right
value the Lua code would raise on at evaluation time raises ExprError here,
at compile time.  Pure.
"""

import ipaddress
import re

import re2

from gproxy.errors import GproxyError

#: RE2's memory budget for one pattern: it bounds the compiled program and so
#: the time one value can take (a pattern over it fails to compile).
MAX_REGEX_MEM = 256 * 1024
MAX_REGEX = 4096
NIL = object()  # an absent element: Lua's nil (JSON null is cjson.null, a value)
# Lua's tonumber() on a string: decimal with optional exponent, or hex; spaces around.
_NUMBER = re.compile(rb"\s*([-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))\s*\Z")


class ExprError(GproxyError):
    """A ``vars`` rule that cannot compile; ``str()`` is lua-resty-expr's message."""


def _tonumber(value):
    """Lua's ``tonumber`` of a string value (bytes) or a JSON value; None when it is none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    if not isinstance(value, bytes):
        return None
    m = _NUMBER.match(value)
    if m is None:
        return None
    text = m.group(1).decode()
    digits = text.lstrip("+-")
    if digits[:2] in ("0x", "0X"):
        number = int(digits, 16)
        return -number if text.startswith("-") else number
    return float(text)


def lua_text(value):
    """Lua's ``tostring`` of a JSON number or string, as ``string.lower`` sees it;
    ExprError for values Lua's string functions would raise on."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "%.14g" % value
    raise ExprError("invalid expression")


# -- comparisons: (left value as bytes or None, compiled right value) -> bool -------

def _equal(right):
    if isinstance(right, (int, float)) and not isinstance(right, bool):
        return lambda left: _tonumber(left) == right
    if isinstance(right, str):
        want = right.encode("utf-8", "surrogatepass")
        return lambda left: left == want
    if right is None or right is NIL:  # compared with nil (cjson.null becomes nil)
        return lambda left: left is None
    return lambda left: False  # a boolean, list or object never equals a string


def _order(test):
    def build(right):
        number = _tonumber(right)
        if number is None:
            return lambda left: False

        def check(left):
            value = _tonumber(left)
            return value is not None and test(value, number)
        return check
    return build


def _regex(case_sensitive):
    def build(right):
        return _searcher(_compile_regex(right, case_sensitive))
    return build


def _searcher(pattern):
    """``left -> bool``: does ``pattern`` match anywhere in ``left`` (bytes, None: no).

    google-re2's ``search`` wraps its C++ ``Match`` in a generator that builds a
    match object; only "is there a match" is wanted here, once per CONNECT, so the
    C++ call is made directly when this build of google-re2 has it (a third of what
    routing by a regex costs a session), else the public API.
    """
    native = getattr(pattern, "_regexp", None)
    anchor = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
    if native is None or anchor is None or not hasattr(native, "Match"):
        return lambda left: left is not None and pattern.search(left) is not None
    match, miss = native.Match, (-1, -1)
    return lambda left: left is not None and match(anchor, left, 0, len(left))[0] != miss


def _compile_regex(right, case_sensitive):
    if right is NIL or right is None or isinstance(right, (bool, list, dict)):
        raise ExprError("invalid regex: expected a string, got %s" % _json_kind(right))
    text = lua_text(right)
    if len(text) > MAX_REGEX:
        raise ExprError("invalid regex: longer than %d characters" % MAX_REGEX)
    options = re2.Options()
    options.max_mem = MAX_REGEX_MEM
    options.never_capture = True  # only "is there a match": lets RE2 use its DFA
    options.log_errors = False
    options.case_sensitive = case_sensitive
    try:
        return re2.compile(text.encode("utf-8", "surrogatepass"), options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "cannot compile"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ExprError("invalid regex '%s': %s" % (text, reason)) from None


def _json_kind(value):
    if value is NIL or value is None:
        return "null"
    return {bool: "boolean", list: "array", dict: "object"}.get(type(value), "number")


def _in(right):
    if not isinstance(right, list):
        return lambda left: False
    wanted = frozenset(v.encode("utf-8", "surrogatepass") for v in right if isinstance(v, str))
    return lambda left: left is not None and left in wanted


def _has(right):
    return lambda left: False  # needs a list on the left; every variable here is a string


def _ipmatch(right):
    if right is NIL or right == "" or right is None:
        raise ExprError("invalid ip address")
    items = right if isinstance(right, (list, dict)) else [right]
    if not items or isinstance(items, dict):
        raise ExprError("invalid ip address")
    nets = tuple(_network(item) for item in items)
    v4 = tuple(n for n in nets if n.version == 4)
    v6 = tuple(n for n in nets if n.version == 6)

    def check(left):
        try:
            addr = ipaddress.ip_address(left.decode("ascii").strip("[]"))
        except (AttributeError, ValueError, UnicodeDecodeError):
            return False  # unset or not an address: ipmatcher says false
        return any(addr in net for net in (v4 if addr.version == 4 else v6))
    return check


def _network(item):
    if not isinstance(item, str):
        raise ExprError("invalid ip address: %s" % lua_text(item) if isinstance(
            item, (int, float)) and not isinstance(item, bool) else "invalid ip address")
    ip, slash, mask = item.partition("/")
    bare = ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip  # as ipmatcher
    try:
        if slash and not mask.isdigit():  # ipmatcher would quietly read "/x" as a host
            raise ValueError(mask)
        return ipaddress.ip_network(bare + slash + mask, strict=False)
    except ValueError:
        raise ExprError("invalid ip address: %s" % (ip if not slash or mask.isdigit()
                                                   else item)) from None


OPERATORS = {
    "==": _equal,
    "~=": lambda right: negate(_equal(right)),
    ">": _order(lambda a, b: a > b),
    ">=": _order(lambda a, b: a >= b),
    "<": _order(lambda a, b: a < b),
    "<=": _order(lambda a, b: a <= b),
    "~~": _regex(True),
    "~*": _regex(False),
    "in": _in,
    "has": _has,
    "ipmatch": _ipmatch,
}


def negate(test):
    return lambda left: not test(left)
