"""The Admin API: APISIX 3.x's ``/apisix/admin`` resources and gproxy's extensions.

Owns: the Flask app factory (``app``), authentication (``auth``), the list
filters (``filters``: the ``name`` regex on RE2), one blueprint
per resource (``resources``, ``plugins``, ``extensions``) and the admin HTTP
listener (``server``).  Talks to a store and a sessions view it is handed;
must not import the data path (``gproxy.proxy``) or the runtime.
"""
