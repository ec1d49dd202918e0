"""APISIX's stream ``ip-restriction`` plugin: its schema, and client addresses against it.

``apisix/plugins/ip-restriction/init.lua`` (the stream plugin is the same
module run in the preread phase, priority 3000: before limit-conn and
mqtt-proxy).  A route lists a ``whitelist`` or a ``blacklist`` (one of them)
of IPv4/IPv6 addresses and CIDRs; a client outside the whitelist, or inside
the blacklist, is refused with ``response_code`` (403 or 404; a stream
session has no body to carry ``message``, so it is accepted and unused, as in
APISIX).  ``IpSet`` matches like resty.ipmatcher: one hash set per prefix
length, so a list of thousands costs a few set lookups per client.  Pure.
"""

import ipaddress

#: APISIX's ``core.schema.ip_def``: an IPv4 or IPv6 address or CIDR (gproxy bounds
#: its length: the patterns run on RE2, in linear time, see ``model.schema``).
IP_DEF = {"maxLength": 128, "anyOf": [
    {"type": "string", "format": "ipv4",
     "pattern": r"^(((\d{1,2})|(1\d{2})|(2[0-4]\d)|(25[0-5]))\.){3}((\d{1,2})|(1\d{2})|(2[0-4]\d)|(25[0-5]))$"},
    {"type": "string", "pattern": r"^([12]?[0-9]{1,2}.){3}[12]?[0-9]{1,2}/([12]?[0-9]|3[0-2])$"},
    {"type": "string", "pattern": r"^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(%.+)?$"},
    {"type": "string", "pattern": r"^([a-fA-F0-9]{0,4}:){1,8}(:[a-fA-F0-9]{0,4}){0,8}([a-fA-F0-9]{0,4})?/[0-9]{1,3}$"},
]}
_LIST = {"type": "array", "items": IP_DEF, "minItems": 1, "maxItems": 10000}
IP_RESTRICTION_SCHEMA = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "minLength": 1, "maxLength": 1024},
        "response_code": {"type": "integer", "minimum": 403, "maximum": 404},
        "whitelist": _LIST,
        "blacklist": _LIST,
    },
    "oneOf": [{"required": ["whitelist"]}, {"required": ["blacklist"]}],
}


def network(text):
    """``ipaddress`` network for an APISIX IP-or-CIDR string; ValueError if invalid."""
    return ipaddress.ip_network(text.split("%")[0], strict=False)


def check_ips(conf):
    """The plugin's ``check_schema`` beyond JSON schema (APISIX's wording), or None."""
    for name in ("whitelist", "blacklist"):
        for cidr in conf.get(name) or ():
            try:
                network(cidr)
            except ValueError:
                return "invalid ip address: %s" % cidr
    return None


class IpSet:
    """Addresses and CIDRs, matched by a set lookup per distinct prefix length."""

    def __init__(self, cidrs):
        self._nets = {4: {}, 6: {}}  # version -> prefix length -> {network int}
        for cidr in cidrs:
            net = network(cidr)
            self._nets[net.version].setdefault(net.prefixlen, set()).add(
                int(net.network_address))

    def __contains__(self, ip):
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # an IPv4 client on a dual-stack listener
        bits = 32 if addr.version == 4 else 128
        value = int(addr)
        for prefix, nets in self._nets[addr.version].items():
            if (value >> (bits - prefix) << (bits - prefix) if prefix else 0) in nets:
                return True
        return False


class IpRestriction:
    """One route's ``ip-restriction`` conf, compiled once per route table."""

    def __init__(self, conf):
        self.code = conf.get("response_code", 403)
        self.whitelist = IpSet(conf["whitelist"]) if conf.get("whitelist") else None
        self.blacklist = IpSet(conf["blacklist"]) if conf.get("blacklist") else None

    def refuses(self, ip):
        """The status to refuse ``ip`` with (restrict() in init.lua), or None to let it on."""
        block = False
        if self.blacklist is not None:
            block = ip in self.blacklist
        if self.whitelist is not None:
            block = ip not in self.whitelist
        return self.code if block else None
