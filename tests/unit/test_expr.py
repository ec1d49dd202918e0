"""gproxy.model.expr against lua-resty-expr v1's behaviour.

The vectors are lua-resty-expr's own test cases (t/v1/*.t, t/validate.t,
re-expressed with the same rules, variables and expected results), plus the
cases where gproxy words an error lua-resty-expr would crash on.  Hypothesis
then checks random rules against a small reference interpreter written here
from the Lua source's rules (not from gproxy's code): both must agree on
every rule and every set of values, and compiling must either succeed or
raise ExprError, never anything else.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gproxy.model.expr import MAX_DEPTH, ExprError, compile as compile_expr


def ev(rule, **values):
    enc = {k: (v.encode() if isinstance(v, str) else v) for k, v in values.items()}
    return compile_expr(rule).eval(enc)


# -- t/v1/sanity.t ------------------------------------------------------------------

@pytest.mark.parametrize("rule, values, want", [
    ([["arg_k", "==", "v"]], {"arg_k": "v"}, True),                     # TEST 1
    ([["arg_k", "v"]], {"arg_k": "not_hit"}, False),                    # 2: short form
    ([["arg_k", "v"]], {"arg_k": "v"}, True),
    ([["arg_k", "==", "v"], ["host", "==", "localhost"], ["server_port", "==", "1984"]],
     {"arg_k": "v", "host": "localhost", "server_port": "1984"}, True),  # 5
    ([["arg_k", "v"], ["host", "localhost"], ["server_port", "1984-not"]],
     {"arg_k": "v", "host": "localhost", "server_port": "1984"}, False),  # 6
    ([["arg_k", "~=", "v"]], {"arg_k": "v"}, False),                    # 7
    ([["arg_k", "~=", "************"]], {"arg_k": "v"}, True),          # 8
    ([["arg_k", ">", 10]], {"arg_k": "11"}, True),                      # 9
    ([["arg_k", ">", 10]], {"arg_k": "9"}, False),                      # 10
    ([["arg_k", ">", 10]], {}, False),                                  # 12
    ([["arg_k", "~="]], {"arg_k": "v"}, True),                          # 13: ~= nil
    ([["arg_k", "in", ["1", "2"]]], {"arg_k": "1"}, True),              # 14
    ([["arg_k", "in", ["1", "2"]]], {"arg_k": "4"}, False),
    ([["arg_k", "in", ["1", "2"]]], {}, False),
    ([["k", "!", ">", 10]], {"k": "11"}, False),                        # 17
    ([["k", "!", ">", 10]], {"k": "9"}, True),
    ([["x", ">", 10], ["x", "!", ">", 15]], {"x": "11"}, True),         # 18
    ([["x", ">", 10], ["x", "!", ">", 15]], {"x": "16"}, False),
    ([["k", "!", "~~", "[a-z]"]], {"k": "a"}, False),                   # 19
    ([["k", "!", "~~", "[a-z]"]], {"k": "9"}, True),
    ([["k", "!", "in", [1, 2]]], {"k": "3"}, True),                     # 20 (strings
    ([["k", "!", "in", ["1", "2"]]], {"k": "1"}, False),                #  never equal numbers)
    ([["x", "~*", "A"]], {"x": "a"}, True),                             # 22
    ([["x", "~*", "A"]], {"x": "A"}, True),
    ([["x", "~*", "A"]], {"x": "b"}, False),
    ([["x", "~*", "A"]], {"x": ""}, False),
    ([["x", "!", "~*", "A"]], {"x": "a"}, False),                       # 23
    ([["x", "!", "~*", "A"]], {"x": ""}, True),
    ([["arg_k", "~~", "A"]], {}, False),                                # 24: unset
    ([["arg_k", "~*", "A"]], {}, False),                                # 25
    ([["arg_age", "~=", 18]], {"arg_age": "18"}, False),                # 26
    ([["arg_age", "~=", 18]], {"arg_age": "16"}, True),                 # 27
    ([["arg_age", "~=", 18]], {"arg_age": "aa"}, True),                 # 28
    ([["arg_age", "~=", "18"]], {"arg_age": "18"}, False),              # 29
    ([["arg_name", "~=", "jack"]], {}, True),                           # 30
    ([["arg_name", "~~", "[a-z]{1,4}"]], {}, False),                    # 31
    ([["arg_name", "~*", "[a-z]{1,4}"]], {}, False),                    # 32
    (["or", ["x", "HAS", "a"], ["x", "HAS", "c"]], {"x": "a"}, False),  # 33: no lists here
    ([["arg_k", ">=", "2"]], {"arg_k": "2"}, True),                     # 34
    ([["arg_k", ">=", 3]], {"arg_k": "2"}, False),
    ([["arg_k", "<=", "2"]], {"arg_k": "3"}, False),                    # 35
    ([["arg_k", "<=", 3]], {"arg_k": "3"}, True),
    ([["http_test", "~="]], {}, False),                                 # 36
])
def test_sanity_vectors(rule, values, want):
    assert ev(rule, **values) is want


# -- t/v1/not.t, and.t, or.t ------------------------------------------------------------

@pytest.mark.parametrize("rule, weight, want", [
    (["!AND", ["w", ">", 10], ["w", "!", ">", 15]], "12", False),
    (["!AND", ["w", ">", 10], ["w", "!", ">", 15]], "8", True),
    (["!AND", ["w", ">", 10], ["w", "!", "<", 15]], "8", True),
    (["!OR", ["w", ">", 10], ["w", "!", ">", 15]], "12", False),
    (["!OR", ["w", ">", 10], ["w", ">", 15]], "8", True),
    (["AND", ["w", ">", 10], ["OR", ["w", "<", 12], ["w", ">", 20]]], "11", True),
    (["AND", ["w", ">", 10], ["OR", ["w", "<", 12], ["w", ">", 20]]], "15", False),
    (["OR", ["w", "==", "x"], ["AND", ["w", ">", 1], ["w", "<", 3]]], "2", True),
    (["and", ["w", ">", 1], ["w", "<", 3]], "2", True),   # logic operators upper-cased
])
def test_logic_vectors(rule, weight, want):
    assert ev(rule, w=weight) is want


# -- numbers as Lua's tonumber reads them -----------------------------------------

@pytest.mark.parametrize("value, want", [
    ("5", True), (" 5 ", True), ("5.0", True), ("0x5", True), ("5e0", True), ("+5", True),
    ("05", True), ("5x", False), ("inf", False), ("", False), ("0x", False),
])
def test_equal_to_a_number_reads_the_value_as_lua_does(value, want):
    assert ev([["v", "==", 5]], v=value) is want


def test_order_operators_convert_a_string_right_value():
    assert ev([["server_port", ">", "9000"]], server_port="9100") is True
    assert ev([["server_port", "<", "abc"]], server_port="1") is False
    assert ev([["server_port", "<", ["1"]]], server_port="0") is False


def test_null_right_value_compares_with_unset():
    assert ev([["mqtt_username", "==", None]]) is True
    assert ev([["mqtt_username", "==", None]], mqtt_username="a") is False
    assert ev([["mqtt_username", "~=", None]], mqtt_username="a") is True
    assert ev([["mqtt_username", "in", [None]]]) is False  # cjson.null is no nil in a list


def test_booleans_and_tables_never_equal_a_value():
    assert ev([["v", "==", True]], v="true") is False
    assert ev([["v", "==", ["a"]]], v="a") is False
    assert ev([["v", "in", {"a": 1}]], v="a") is False


def test_short_form_lowercases_the_value_as_lua_does():
    # compile_expr lower-cases the operator before it becomes the value
    assert ev([["v", "ABC"]], v="abc") is True
    assert ev([["v", "ABC"]], v="ABC") is False
    assert ev([["v", 5]], v="5") is True


# -- regexes on RE2 -----------------------------------------------------------------

def test_regex_searches_anywhere_and_handles_utf8_and_bytes():
    assert ev([["id", "~~", "^dev-[0-9]+$"]], id="dev-42") is True
    assert ev([["id", "~~", "^dev-[0-9]+$"]], id="xdev-42") is False
    assert ev([["id", "~~", "42"]], id="dev-42-x") is True
    assert ev([["id", "~~", "^é.$"]], id="éa") is True
    assert compile_expr([["id", "~~", "^a"]]).eval({"id": b"a\xff\xfe"}) is True  # not UTF-8
    assert ev([["id", "~*", "^DEV"]], id="dev-1") is True
    assert ev([["id", "~~", 42]], id="x42") is True  # a number is its Lua text


def test_pathological_pattern_is_linear():
    import time
    rule = compile_expr([["id", "~~", "(a+)+$"]])
    value = b"a" * 5000 + b"!"
    started = time.perf_counter()
    assert rule.eval({"id": value}) is False
    assert time.perf_counter() - started < 0.5  # a backtracking engine takes ages here


# -- ipmatch --------------------------------------------------------------------------

@pytest.mark.parametrize("right, addr, want", [
    ("127.0.0.1", "127.0.0.1", True),
    (["127.0.0.1"], "127.0.0.2", False),
    ("127.0.0.0/16", "127.0.9.9", True),
    (["10.0.0.0/8", "192.168.0.0/16"], "192.168.3.4", True),
    ("::1", "::1", True),
    ("[::1]", "::1", True),
    ("fe80::/10", "fe80::1", True),
    ("fe80::/10", "127.0.0.1", False),
    ("0.0.0.0/0", "8.8.8.8", True),
])
def test_ipmatch(right, addr, want):
    assert ev([["remote_addr", "ipmatch", right]], remote_addr=addr) is want


def test_ipmatch_on_unset_or_non_address_is_false():
    assert ev([["remote_addr", "ipmatch", "127.0.0.1"]]) is False
    assert ev([["remote_addr", "ipmatch", "127.0.0.1"]], remote_addr="nope") is False
    assert ev([["remote_addr", "!", "ipmatch", "127.0.0.1"]], remote_addr="nope") is True


# -- compile errors: lua-resty-expr's messages (t/validate.t, ipmatcher.t) -----------

@pytest.mark.parametrize("rule, message", [
    ([["arg_k", "=", "v"]], "invalid operator '='"),
    ([["arg_k", "invalid", 10]], "invalid operator 'invalid'"),
    ([["arg_k", "INVALID", 10]], "invalid operator 'invalid'"),
    ([["arg_k"]], "invalid expression"),
    ([[]], "rule too short"),
    ([["!", "arg_k", "==", "1"]], "bad 'not' expression"),
    (None, "missing argument rule"),
    (["OR", ["arg_weight", ">", 10]], "rule too short"),
    (["OR", ["arg_weight", ">", 10], ["AND"]], "rule too short"),
    (["arg_k", "==", "v"], "rule should be wrapped inside brackets"),
    ([["remote_addr", "ipmatch"]], "invalid ip address"),
    ([["remote_addr", "ipmatch", ""]], "invalid ip address"),
    ([["remote_addr", "ipmatch", []]], "invalid ip address"),
    ([["remote_addr", "ipmatch", [""]]], "invalid ip address: "),
    ([["remote_addr", "ipmatch", ["10.0.0.1", "10.0.0.300"]]], "invalid ip address: 10.0.0.300"),
    ([["a", "==", 1], {}], "rule too short"),       # an object is a Lua table of length 0
    # gproxy's words where the Lua code would raise instead
    ([["a", "==", 1], "x"], "invalid expression"),
    ([[1, "==", 1]], "invalid expression"),
    ([["a", None, 1]], "invalid expression"),
    ([["a", "~~", "(a"]], "invalid regex '(a': missing ): (a"),
    ([["a", "~~", "(?=a)"]], "invalid regex '(?=a)': invalid perl operator: (?="),
    ([["a", "~~", ["x"]]], "invalid regex: expected a string, got array"),
    ([["a", "~~"]], "invalid regex: expected a string, got null"),
    ([["remote_addr", "ipmatch", "10.0.0.0/x"]], "invalid ip address: 10.0.0.0/x"),
])
def test_compile_errors(rule, message):
    with pytest.raises(ExprError) as info:
        compile_expr(rule)
    assert str(info.value) == message


def test_empty_rule_passes_and_unknown_names_are_refused_when_asked():
    assert compile_expr([]).eval({}) is True
    with pytest.raises(ExprError) as info:
        compile_expr([["mqtt_user", "==", "a"]], known={"mqtt_username", "sni"})
    assert str(info.value) == "unknown variable 'mqtt_user' (one of: mqtt_username, sni)"
    assert compile_expr([["sni", "==", "a"], ["OR", ["sni", "~=", "b"], ["mqtt_username", "a"]]],
                        known={"mqtt_username", "sni"}).names == {"sni", "mqtt_username"}


def test_nesting_is_bounded():
    rule = [["a", "==", "b"]]
    for _ in range(MAX_DEPTH + 1):
        rule = ["AND", rule, ["a", "==", "b"]]
    with pytest.raises(ExprError, match="nested deeper"):
        compile_expr(rule)


# -- random rules against a reference interpreter ---------------------------------------

NAMES = ("a", "b")
VALUES = st.one_of(st.none(), st.sampled_from(["1", "2", "10", "x", "X", " 2", "1.5", "", "0x2"]))
RIGHTS = st.one_of(st.sampled_from(["1", "2", "x", "X", "[0-9]", "^x$", ""]), st.integers(-2, 12),
                   st.none(), st.lists(st.sampled_from(["1", "x", 2]), max_size=3))
OPS = st.sampled_from(["==", "~=", ">", ">=", "<", "<=", "~~", "~*", "in", "has"])


def _atom():
    plain = st.tuples(st.sampled_from(NAMES), OPS, RIGHTS).map(list)
    negated = st.tuples(st.sampled_from(NAMES), st.just("!"), OPS, RIGHTS).map(list)
    return st.one_of(plain, negated)


RULES = st.recursive(
    st.lists(_atom(), min_size=1, max_size=3),
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(["AND", "OR", "!AND", "!OR"]),
                  st.lists(st.one_of(inner, _atom()), min_size=2, max_size=3))
        .map(lambda t: [t[0]] + t[1]),
        st.lists(st.one_of(inner, _atom()), min_size=1, max_size=3)),
    max_leaves=8)


def _num(v):
    import re
    if isinstance(v, bool) or v is None or isinstance(v, list):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    m = re.fullmatch(r"\s*([-+]?)(0[xX][0-9a-fA-F]+|\d+\.?\d*|\.\d+)\s*", v)
    if not m:
        return None
    body = m.group(2)
    n = float(int(body, 16)) if body[:2].lower() == "0x" else float(body)
    return -n if m.group(1) == "-" else n


def _ref_atom(l, op, r):
    import re
    op = op.lower()
    if op in ("==", "~="):
        if isinstance(r, int) and not isinstance(r, bool):
            n = _num(l)
            eq = n is not None and n == r
        else:
            eq = (l is None) if r is None else (isinstance(r, str) and l == r)
        return eq if op == "==" else not eq
    if op in (">", ">=", "<", "<="):
        a, b = _num(l), _num(r)
        if a is None or b is None:
            return False
        return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op]
    if op in ("~~", "~*"):
        return l is not None and re.search(str(r), l, re.I if op == "~*" else 0) is not None
    if op == "in":
        return isinstance(r, list) and l is not None and l in [x for x in r if isinstance(x, str)]
    return False  # has: no list values


def _ref(rule, values):
    if isinstance(rule[0], list):
        return all(_ref(sub, values) for sub in rule)
    if rule[0] in ("AND", "OR", "!AND", "!OR"):
        parts = [_ref(sub, values) for sub in rule[1:]]
        out = all(parts) if rule[0].endswith("AND") else any(parts)
        return not out if rule[0].startswith("!") else out
    if len(rule) == 4:
        return not _ref_atom(values.get(rule[0]), rule[2], rule[3])
    return _ref_atom(values.get(rule[0]), rule[1], rule[2])


def _regex_ok(rule):
    if isinstance(rule, list):
        if len(rule) in (3, 4) and isinstance(rule[-2], str) and rule[-2] in ("~~", "~*"):
            return isinstance(rule[-1], (str, int)) and not isinstance(rule[-1], bool) \
                and rule[-1] is not None
        return all(_regex_ok(x) for x in rule if isinstance(x, list))
    return True


@settings(max_examples=400, deadline=None)
@given(RULES, st.fixed_dictionaries({n: VALUES for n in NAMES}))
def test_random_rules_agree_with_the_reference(rule, values):
    if not _regex_ok(rule):
        with pytest.raises(ExprError):
            compile_expr(rule)
        return
    compiled = compile_expr(rule)
    enc = {k: None if v is None else v.encode() for k, v in values.items()}
    assert compiled.eval(enc) is _ref(rule, values)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4)),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.text(max_size=2), inner, max_size=2), max_leaves=12))
def test_any_json_compiles_or_raises_expr_error(rule):
    try:
        compiled = compile_expr(rule)
    except ExprError:
        return
    assert compiled.eval({}) in (True, False)


def test_regex_without_the_native_call_uses_the_public_api():
    import re2

    from gproxy.model.exprops import _searcher

    class Public:  # a google-re2 without the C++ Match: only the public search
        def __init__(self, pattern):
            self.search = re2.compile(pattern).search

    native, public = _searcher(re2.compile(b"^dev-[0-9]+$")), _searcher(Public(b"^dev-[0-9]+$"))
    for value in (b"dev-42", b"xdev-42", b"", None):
        assert native(value) is public(value) is (value == b"dev-42")
