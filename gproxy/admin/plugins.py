"""``/apisix/admin/plugins``: the stream plugins gproxy knows and their schemas."""

from flask import Blueprint, request

from gproxy.admin.resources import json_response
from gproxy.model.resources import STREAM_PLUGINS


def plugins_blueprint(prefix):
    bp = Blueprint("plugins", __name__, url_prefix=prefix + "/plugins")

    @bp.get("/list")
    def plugin_list():
        return json_response(sorted(STREAM_PLUGINS))

    @bp.get("/<name>")
    def plugin_schema(name):
        if request.args.get("subsystem") != "stream" or name not in STREAM_PLUGINS:
            return json_response({"error_msg": "plugin not found in subsystem %s"
                                  % request.args.get("subsystem", "http")}, 404)
        schema = dict(STREAM_PLUGINS[name])
        if name == "mqtt-proxy":
            schema["properties"] = dict(schema["properties"], protocol_name=dict(
                schema["properties"]["protocol_name"], default="MQTT"))
        return json_response(schema)

    return bp
