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

from gproxy.model.exprops import NIL, OPERATORS, ExprError, lua_text, negate

__all__ = ["ExprError", "Expr", "compile"]
#: Nesting of ``AND``/``OR`` lists a rule may have (Lua has no such bound; a
#: deeper rule is refused rather than run Python out of stack).
MAX_DEPTH = 32
_LOGIC = ("AND", "OR", "!AND", "!OR")


# -- compiling ------------------------------------------------------------------

class Expr:
    """A compiled rule: ``eval(values)``; ``names`` are the variables it reads.

    ``need`` is ``(name, values)`` when the rule can pass only if variable
    ``name`` is one of ``values`` (bytes): an ``==`` on a string or an ``in``
    that every way through the rule requires.  A route table indexes routes by
    it, so a CONNECT is checked against the few routes it can pass, not all.
    None: no such condition.
    """

    __slots__ = ("rule", "names", "need", "_test")

    def __init__(self, rule, test, names, need=None):
        self.rule = rule
        self._test = test
        self.names = frozenset(names)
        self.need = need

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
            first = lua_text(rule[0]).upper()
        except ExprError:
            first = None
        if first not in _LOGIC:
            raise ExprError("rule should be wrapped inside brackets")
    test, need = _compile(rule, names, 0)
    if known is not None:
        for name in names:
            if name not in known:
                raise ExprError("unknown variable '%s' (one of: %s)"
                                % (name, ", ".join(sorted(known))))
    return Expr(rule, test, names, need)


def _compile(rules, names, depth):
    """``(test, need)`` for a rule or sub-rule (see ``Expr``)."""
    if depth > MAX_DEPTH:
        raise ExprError("rule nested deeper than %d levels" % MAX_DEPTH)
    if isinstance(rules, dict) or (isinstance(rules, list) and not rules):
        raise ExprError("rule too short")  # a JSON object is a Lua table of length 0
    if not isinstance(rules, list):
        raise ExprError("invalid expression")
    if isinstance(rules[0], (list, dict)):
        return _all([_compile(sub, names, depth + 1) for sub in rules])
    op = lua_text(rules[0]).upper()
    if op in _LOGIC:
        if len(rules) <= 2:
            raise ExprError("rule too short")
        parts = [_compile(sub, names, depth + 1) for sub in rules[1:]]
        if op == "AND":
            return _all(parts)
        if op == "OR":
            return _any(parts)
        test, _ = _all(parts) if op == "!AND" else _any(parts)
        return negate(test), None
    return _compile_expr(rules, names)


def _compile_expr(expr, names):
    if len(expr) == 4:
        if expr[1] != "!":
            raise ExprError("bad 'not' expression")
        name, op, right, reverse = expr[0], expr[2], expr[3], True
    else:
        name, op, right = (expr + [NIL] * 3)[:3]
        reverse = False
    if op is not NIL:
        op = lua_text(op).lower()
    if right is NIL and op not in OPERATORS:
        right, op = op, "=="  # ["var", "value"]: lua-resty-expr's short form of ==
        if right is NIL:
            raise ExprError("invalid expression")
    if name is NIL or op is NIL:
        raise ExprError("invalid expression")
    if op not in OPERATORS:
        raise ExprError("invalid operator '%s'" % op)
    if not isinstance(name, str):
        raise ExprError("invalid expression")
    names.append(name)
    test = OPERATORS[op](right)
    need = None
    if reverse:
        test = negate(test)
    elif op == "==" and isinstance(right, str):
        need = (name, frozenset((right.encode("utf-8", "surrogatepass"),)))
    elif op == "in" and isinstance(right, list):
        need = (name, frozenset(v.encode("utf-8", "surrogatepass")
                                for v in right if isinstance(v, str)))
    return (lambda values: test(values.get(name))), need


def _all(parts):
    """AND: the narrowest need of any part holds for the whole."""
    tests = [test for test, _ in parts]
    needs = [need for _, need in parts if need is not None]
    need = min(needs, key=lambda n: len(n[1])) if needs else None
    if len(tests) == 1:
        return tests[0], need
    return (lambda values: all(test(values) for test in tests)), need


def _any(parts):
    """OR: a need only when every part needs the same variable (their values joined)."""
    tests = [test for test, _ in parts]
    needs = [need for _, need in parts]
    need = None
    if all(needs) and len({n[0] for n in needs}) == 1:
        need = (needs[0][0], frozenset().union(*(n[1] for n in needs)))
    return (lambda values: any(test(values) for test in tests)), need
