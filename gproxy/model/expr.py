"""APISIX's ``vars`` expressions (lua-resty-expr v1), compiled once, evaluated per CONNECT.

``compile(rule)`` turns the JSON form (``[["mqtt_username", "==", "a"], ["OR",
[...], [...]]]``) into an ``Expr`` whose ``eval(values)`` says whether the
variables pass; ``values`` maps a variable name to its value as bytes (None:
unset), as nginx variables are strings.  A rule that cannot compile raises
ExprError with lua-resty-expr's own message (``invalid operator '='``, ``rule
too short``, ``bad 'not' expression``, ``invalid expression``, ``rule should
be wrapped inside brackets``, ``invalid ip address: x``); the Admin API
prefixes it as APISIX does (``failed to validate the 'vars' expression: ...``).

Semantics follow ``resty/expr/v1.lua`` exactly where it is defined: operators
are case-insensitive; ``==``/``~=`` compare as numbers (Lua's ``tonumber``)
when the right value is a number, else as strings; ``>``, ``>=``, ``<``,
``<=`` convert both sides and are false when either is not a number; ``in``
looks for the value among the right list's strings; ``has`` needs a list on
the left (none of gproxy's variables is one, so it is false); ``!`` before an
operator reverses it; a two-element ``["var", "value"]`` means ``==``; an
unset variable equals ``null`` and matches no regex.  Where the Lua code
would raise at evaluation time (a list as a regex, a number as an IP) the
rule is refused here instead.  Regexes (``~~``, ``~*`` case-insensitive) run
on RE2, linear in the pattern and the value whatever the pattern (APISIX uses
PCRE, which backtracks): a pattern RE2 cannot compile (backreferences,
look-around) is refused at write time, and ``$`` matches only at the very
end.  Pure: no I/O.
"""

import ipaddress
import re

import re2

from gproxy.errors import GproxyError

#: RE2's memory budget for one pattern: it bounds the compiled program and so
#: the time one value can take (a pattern over it fails to compile).
MAX_REGEX_MEM = 256 * 1024
MAX_REGEX = 4096
#: Nesting of ``AND``/``OR`` lists a rule may have (Lua has no such bound; a
#: deeper rule is refused rather than run Python out of stack).
MAX_DEPTH = 32
_LOGIC = ("AND", "OR", "!AND", "!OR")
_NIL = object()  # an absent element: Lua's nil (JSON null is cjson.null, a value)
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


def _lua_text(value):
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
    if right is None or right is _NIL:  # compared with nil (cjson.null becomes nil)
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
        pattern = _compile_regex(right, case_sensitive)
        return lambda left: left is not None and pattern.search(left) is not None
    return build


def _compile_regex(right, case_sensitive):
    if right is _NIL or right is None or isinstance(right, (bool, list, dict)):
        raise ExprError("invalid regex: expected a string, got %s" % _json_kind(right))
    text = _lua_text(right)
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
    if value is _NIL or value is None:
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
    if right is _NIL or right == "" or right is None:
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
        raise ExprError("invalid ip address: %s" % _lua_text(item) if isinstance(
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
    "~=": lambda right: _negate(_equal(right)),
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


def _negate(test):
    return lambda left: not test(left)


# -- compiling ------------------------------------------------------------------

class Expr:
    """A compiled rule: ``eval(values)``; ``names`` are the variables it reads."""

    __slots__ = ("rule", "names", "_test")

    def __init__(self, rule, test, names):
        self.rule = rule
        self._test = test
        self.names = frozenset(names)

    def eval(self, values):
        return self._test(values)


def compile(rule, known=None):  # noqa: A001 (the module's verb, as re.compile)
    """``rule`` (a decoded JSON list) as an Expr; ExprError with lua-resty-expr's
    message if it is not one.  ``known``, if given, is the set of variable
    names a rule may read (gproxy refuses a name it never sets: a typo would
    otherwise be a route that silently never matches)."""
    if rule is None:
        raise ExprError("missing argument rule")
    if not isinstance(rule, list):
        raise ExprError("invalid expression")
    names = []
    if not rule:
        return Expr(rule, lambda values: True, names)
    if not isinstance(rule[0], (list, dict)):
        try:
            first = _lua_text(rule[0]).upper()
        except ExprError:
            first = None
        if first not in _LOGIC:
            raise ExprError("rule should be wrapped inside brackets")
    test = _compile(rule, names, 0)
    if known is not None:
        for name in names:
            if name not in known:
                raise ExprError("unknown variable '%s' (one of: %s)"
                                % (name, ", ".join(sorted(known))))
    return Expr(rule, test, names)


def _compile(rules, names, depth):
    if depth > MAX_DEPTH:
        raise ExprError("rule nested deeper than %d levels" % MAX_DEPTH)
    if isinstance(rules, dict) or (isinstance(rules, list) and not rules):
        raise ExprError("rule too short")  # a JSON object is a Lua table of length 0
    if not isinstance(rules, list):
        raise ExprError("invalid expression")
    if isinstance(rules[0], (list, dict)):
        return _all([_compile(sub, names, depth + 1) for sub in rules])
    op = _lua_text(rules[0]).upper()
    if op in _LOGIC:
        if len(rules) <= 2:
            raise ExprError("rule too short")
        parts = [_compile(sub, names, depth + 1) for sub in rules[1:]]
        test = _all(parts) if op.endswith("AND") else _any(parts)
        return _negate(test) if op.startswith("!") else test
    return _compile_expr(rules, names)


def _compile_expr(expr, names):
    if len(expr) == 4:
        if expr[1] != "!":
            raise ExprError("bad 'not' expression")
        name, op, right, reverse = expr[0], expr[2], expr[3], True
    else:
        name, op, right = (expr + [_NIL] * 3)[:3]
        reverse = False
    if op is not _NIL:
        op = _lua_text(op).lower()
    if right is _NIL and op not in OPERATORS:
        right, op = op, "=="  # ["var", "value"]: lua-resty-expr's short form of ==
        if right is _NIL:
            raise ExprError("invalid expression")
    if name is _NIL or op is _NIL:
        raise ExprError("invalid expression")
    if op not in OPERATORS:
        raise ExprError("invalid operator '%s'" % op)
    if not isinstance(name, str):
        raise ExprError("invalid expression")
    names.append(name)
    test = OPERATORS[op](right)
    if reverse:
        test = _negate(test)
    return lambda values: test(values.get(name))


def _all(tests):
    if len(tests) == 1:
        return tests[0]
    return lambda values: all(test(values) for test in tests)


def _any(tests):
    return lambda values: any(test(values) for test in tests)
