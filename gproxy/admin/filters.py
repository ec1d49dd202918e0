"""The list endpoints' filters: ``name`` (a regex), ``label``, ``upstream_id``/``service_id``.

APISIX matches ``?name=`` as a regex (PCRE with a backtracking limit).  Any
key, even a viewer's, can send one, and the Admin API shares its hub with
every relay, so gproxy matches it with RE2 (``google-re2``): linear in the
pattern and the name, never backtracking, so ``(a+)+$`` costs what ``a+$``
costs.  The pattern is compiled once per request, with its size bounded
(``MAX_PATTERN`` characters, ``MAX_MEM`` bytes of RE2 program and DFA cache:
at most about a millisecond per name), and matching yields to the hub
(``gproxy.hub.pause``) every ``YIELD_AFTER`` seconds.  A pattern RE2 cannot compile (bad syntax,
or a PCRE-only feature such as backreferences and look-around) raises
FilterError, which the Admin API answers with 400 and changes nothing.
"""

import re2

from gproxy import hub

MAX_PATTERN = 1024
#: RE2's memory budget for one pattern (its default is 8 MiB).  It bounds the
#: compiled program, and so the worst time one name can take (about 1 ms);
#: a pattern over it fails to compile ("pattern too large").
MAX_MEM = 256 * 1024
YIELD_AFTER = 0.002


class FilterError(ValueError):
    """A list filter that cannot be used; ``str()`` is the reason."""


def _options():
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.never_capture = True  # only "is there a match": lets RE2 use its DFA
    options.log_errors = False  # RE2 would print each bad pattern on stderr
    return options


def compile_name(pattern):
    """The compiled ``name`` filter, or FilterError saying why it cannot be one."""
    if len(pattern) > MAX_PATTERN:
        raise FilterError("invalid name filter: longer than %d characters" % MAX_PATTERN)
    try:
        return re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "cannot compile"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise FilterError("invalid name filter: %s" % reason) from None


class ListFilter:
    """Every filter of one list request, compiled once: ``keep(value)``."""

    def __init__(self, args):
        name = args.get("name")
        self.name = compile_name(name) if name else None
        self.label = args.get("label")
        wanted = dict(args.items())
        field, _, want = args.get("filter", "").partition("=")
        if field:
            wanted[field] = want
        self.ids = {f: wanted[f] for f in ("upstream_id", "service_id") if f in wanted}

    def keep(self, value):
        if self.name is not None and not self.name.search(str(value.get("name", ""))):
            return False
        if self.label:
            key, _, want = self.label.partition(":")
            labels = value.get("labels") or {}
            if key not in labels or (want and labels[key] != want):
                return False
        return all(str(value.get(f)) == want for f, want in self.ids.items())

    def apply(self, records):
        """The records whose value passes, yielding to the hub as it goes."""
        kept = []
        for record in records:
            if self.keep(record.value):
                kept.append(record)
            hub.pause(YIELD_AFTER)  # let the relays run between names
        return kept
