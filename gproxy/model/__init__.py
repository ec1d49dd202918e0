"""What routes, upstreams and balancers are: pure data and decisions.

Owns: APISIX's resource schemas and Admin checks (``resources``, with the
jsonschema.lua-worded checker ``schema``; the mqtt-proxy conf's own checks
and runtime form in ``mqttproxy``), the immutable route table and its
matching (``routes``; routes chosen by the CONNECT: the ``vars`` expressions
in ``expr``/``exprops``, their order and index in ``varsroutes``), the sticky
traffic split (``split``), and the balancers including the APISIX-exact chash
ring (``balancer``).  Pure: no sockets, files, clocks or gevent; must not
import the data path, the store, the Admin API or the runtime.
"""
