// Stream routes: the list, and the form that creates or edits one.

import {api, enc, listValues} from "./api.js";
import {$, h, clear} from "./dom.js";
import {ago, dateTime, mqttVersion, nodeList, nodeAddr} from "./format.js";
import {ResourceEditor, UpstreamEditor, fillUpstreamSelect, setField, numberOrText} from "./editor.js";
import {SplitEditor, VarsEditor, varsText} from "./vars.js";

const MQTT = "mqtt-proxy";

export function matchText(route) {
  const parts = [];
  if (route.server_addr !== undefined) parts.push(`on ${route.server_addr}`);
  if (route.server_port !== undefined) parts.push(`port ${route.server_port}`);
  if (route.remote_addr !== undefined) parts.push(`from ${route.remote_addr}`);
  if (route.sni !== undefined) parts.push(`sni ${route.sni}`);
  const conf = route.plugins && route.plugins[MQTT];
  if (conf && conf.vars !== undefined && !(Array.isArray(conf.vars) && !conf.vars.length)) {
    parts.push(varsText(conf.vars));
    if (conf.priority) parts.push(`priority ${conf.priority}`);
  }
  return parts.length ? parts.join(" · ") : "any";
}

export function upstreamText(u) {
  if (!u || typeof u !== "object") return "–";
  const type = u.type || "roundrobin";
  const balancer = type === "chash" ? `chash(${u.key || "?"})` : type;
  const nodes = nodeList(u.nodes).map(nodeAddr);
  return `${balancer} · ${nodes.length ? nodes.join(", ") : "no nodes"}`;
}

function mqttCell(route) {
  const conf = route.plugins && route.plugins[MQTT];
  if (!conf) return h("span", {className: "badge badge-muted"}, "off");
  const name = conf.protocol_name || "MQTT";
  return h("span", {className: "badge badge-ok", title: `protocol_name ${name}, protocol_level ${conf.protocol_level}`},
    `MQTT ${mqttVersion(conf.protocol_level)}`);
}

export function createRoutesList(section, ctx) {
  const tbody = $("tbody", section);
  const empty = $("[data-role=empty]", section);
  $("[data-action=reload]", section).addEventListener("click", () => show());

  async function remove(id) {
    const ok = await ctx.confirm(`Delete stream route ${id}?`,
      "New connections will no longer match it. Live sessions keep running until they end.", "Delete");
    if (!ok) return;
    try {
      await api("DELETE", `/stream_routes/${enc(id)}`);
      ctx.toast(`Stream route ${id} deleted.`);
    } catch (err) {
      ctx.error(`Could not delete stream route ${id}: ${err.message}`);
    }
    show();
  }

  function row(route, live) {
    const id = String(route.id);
    return h("tr", {"data-id": id},
      h("td", {className: "mono nowrap"}, h("a", {href: `#/routes/${enc(id)}`}, id)),
      h("td", {}, route.name || h("span", {className: "muted"}, "–"),
        route.desc ? h("div", {className: "muted small"}, route.desc) : null),
      h("td", {className: "mono small"}, matchText(route)),
      h("td", {}, mqttCell(route)),
      h("td", {className: "mono small"}, route.upstream_id !== undefined
        ? h("a", {href: `#/upstreams/${enc(String(route.upstream_id))}`}, `upstream ${route.upstream_id}`)
        : upstreamText(route.upstream)),
      h("td", {className: "num"}, String(live || 0)),
      h("td", {className: "small", title: dateTime(route.update_time)}, ago(route.update_time)),
      h("td", {className: "row-actions"},
        h("a", {className: "btn btn-small", href: `#/routes/${enc(id)}`}, "Edit"),
        h("a", {className: "btn btn-small", href: `#/routes/${enc(id)}/json`}, "JSON"),
        h("button", {type: "button", className: "btn btn-small btn-danger-outline",
          onclick: () => remove(id)}, "Delete")));
  }

  async function show() {
    try {
      const [routes, live] = await Promise.all([
        listValues("stream_routes"),
        // live sessions per route: the registry's counters, not a walk of the sessions
        api("GET", "/gproxy/stats").then((r) => r.data.per_route || {}).catch(() => ({})),
      ]);
      clear(tbody);
      for (const route of routes) tbody.appendChild(row(route, live[String(route.id)]));
      empty.hidden = routes.length > 0;
    } catch (err) {
      ctx.error(`Could not list stream routes: ${err.message}`);
    }
  }

  return {show};
}

export function createRouteEditor(section, ctx) {
  const form = $("form", section);
  const f = (name) => form.elements.namedItem(name);
  const upstream = new UpstreamEditor($("[data-role=upstream-inline]", section));
  const refBox = $("[data-role=upstream-ref]", section);
  const inlineBox = $("[data-role=upstream-inline]", section);
  const mqttFields = $("[data-role=mqtt-fields]", section);
  const mqttExtra = $("[data-role=mqtt-extra]", section);
  const vars = new VarsEditor(mqttExtra);
  const split = new SplitEditor(mqttExtra);
  let upstreams = [];

  function syncMode() {
    const ref = form.querySelector("input[name=upstream_mode]:checked").value === "ref";
    refBox.hidden = !ref;
    inlineBox.hidden = ref;
  }
  function syncMqtt() {
    const on = f("mqtt_enabled").checked;
    for (const box of [mqttFields, mqttExtra]) {
      for (const el of box.querySelectorAll("input, select, textarea, button")) el.disabled = !on;
      box.classList.toggle("disabled", !on);
    }
  }
  for (const radio of form.querySelectorAll("input[name=upstream_mode]")) {
    radio.addEventListener("change", syncMode);
  }
  f("mqtt_enabled").addEventListener("change", syncMqtt);

  function fill(route) {
    const text = (v) => (v === undefined || v === null ? "" : String(v));
    for (const name of ["id", "name", "desc", "server_addr", "server_port", "remote_addr"]) {
      f(name).value = text(route[name]);
    }
    const conf = route.plugins && route.plugins[MQTT];
    f("mqtt_enabled").checked = Boolean(conf);
    f("protocol_name").value = conf && conf.protocol_name !== undefined ? String(conf.protocol_name) : "MQTT";
    const level = conf && conf.protocol_level !== undefined ? String(conf.protocol_level) : "4";
    const select = f("protocol_level");
    if (![...select.options].some((o) => o.value === level)) {
      select.appendChild(h("option", {value: level}, `${level} — custom`));
    }
    select.value = level;
    vars.fill(conf || {});
    split.fill(conf || {}, upstreams);
    const ref = route.upstream_id !== undefined && route.upstream_id !== null;
    form.querySelector(`input[name=upstream_mode][value=${ref ? "ref" : "inline"}]`).checked = true;
    fillUpstreamSelect(f("upstream_id"), upstreams, ref ? route.upstream_id : undefined);
    upstream.fill(route.upstream || {type: "chash", key: "mqtt_client_id"});
    syncMode();
    syncMqtt();
  }

  function read(base) {
    const route = base;
    if (!f("id").readOnly) setField(route, "id", f("id").value);  // an edit keeps its id
    for (const name of ["name", "desc", "server_addr", "remote_addr"]) {
      setField(route, name, f(name).value);
    }
    setField(route, "server_port", f("server_port").value, numberOrText);
    const plugins = Object.assign({}, route.plugins || {});
    if (f("mqtt_enabled").checked) {
      const conf = Object.assign({}, plugins[MQTT] || {});
      setField(conf, "protocol_name", f("protocol_name").value);
      conf.protocol_level = numberOrText(f("protocol_level").value);
      plugins[MQTT] = split.read(vars.read(conf));
    } else {
      delete plugins[MQTT];
    }
    if (Object.keys(plugins).length) route.plugins = plugins;
    else delete route.plugins;
    if (form.querySelector("input[name=upstream_mode]:checked").value === "ref") {
      route.upstream_id = f("upstream_id").value;
      delete route.upstream;
    } else {
      route.upstream = upstream.read(route.upstream);
      delete route.upstream_id;
    }
    return route;
  }

  const editor = new ResourceEditor(section, {
    kind: "stream_routes",
    noun: "stream route",
    listHash: "#/routes",
    defaults: () => ({
      plugins: {[MQTT]: {protocol_name: "MQTT", protocol_level: 4}},
      upstream: {type: "chash", key: "mqtt_client_id", nodes: []},
    }),
    load: async () => { upstreams = await listValues("upstreams"); },
    fill,
    read,
    deleteWarning: () => "New connections will no longer match it. Live sessions keep running until they end.",
    confirm: ctx.confirm,
    toast: ctx.toast,
    navigate: ctx.navigate,
  });
  return editor;
}
