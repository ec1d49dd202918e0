// Upstreams: the list, and the form that creates or edits one.

import {api, enc, listValues} from "./api.js";
import {$, h, clear} from "./dom.js";
import {ago, dateTime, nodeList, nodeAddr} from "./format.js";
import {ResourceEditor, UpstreamEditor, setField} from "./editor.js";

export function createUpstreamsList(section, ctx) {
  const tbody = $("tbody", section);
  const empty = $("[data-role=empty]", section);
  $("[data-action=reload]", section).addEventListener("click", () => show());

  async function remove(id, users) {
    const warning = users.length
      ? `Stream routes ${users.join(", ")} use it: they will fail to connect to any broker.`
      : "No stream route uses it.";
    const ok = await ctx.confirm(`Delete upstream ${id}?`, warning, "Delete");
    if (!ok) return;
    try {
      await api("DELETE", `/upstreams/${enc(id)}`);
      ctx.toast(`Upstream ${id} deleted.`);
    } catch (err) {
      ctx.error(`Could not delete upstream ${id}: ${err.message}`);
    }
    show();
  }

  function row(u, users) {
    const id = String(u.id);
    const type = u.type || "roundrobin";
    return h("tr", {"data-id": id},
      h("td", {className: "mono nowrap"}, h("a", {href: `#/upstreams/${enc(id)}`}, id)),
      h("td", {}, u.name || h("span", {className: "muted"}, "–"),
        u.desc ? h("div", {className: "muted small"}, u.desc) : null),
      h("td", {className: "mono small"}, type === "chash" ? `chash(${u.key || "?"})` : type),
      h("td", {className: "mono small"}, nodeList(u.nodes).map((n) =>
        h("div", {}, `${nodeAddr(n)} `, h("span", {className: "muted"}, `w${n.weight}`)))),
      h("td", {className: "small"}, users.length
        ? users.map((r, i) => [i ? ", " : "", h("a", {href: `#/routes/${enc(r)}`}, r)])
        : h("span", {className: "muted"}, "no route")),
      h("td", {className: "small", title: dateTime(u.update_time)}, ago(u.update_time)),
      h("td", {className: "row-actions"},
        h("a", {className: "btn btn-small", href: `#/upstreams/${enc(id)}`}, "Edit"),
        h("a", {className: "btn btn-small", href: `#/upstreams/${enc(id)}/json`}, "JSON"),
        h("button", {type: "button", className: "btn btn-small btn-danger-outline",
          onclick: () => remove(id, users)}, "Delete")));
  }

  async function show() {
    try {
      const [upstreams, routes] = await Promise.all([listValues("upstreams"), listValues("stream_routes")]);
      clear(tbody);
      for (const u of upstreams) {
        const users = routes.filter((r) => r.upstream_id !== undefined && String(r.upstream_id) === String(u.id))
          .map((r) => String(r.id));
        tbody.appendChild(row(u, users));
      }
      empty.hidden = upstreams.length > 0;
    } catch (err) {
      ctx.error(`Could not list upstreams: ${err.message}`);
    }
  }

  return {show};
}

export function createUpstreamEditor(section, ctx) {
  const form = $("form", section);
  const f = (name) => form.elements.namedItem(name);
  const upstream = new UpstreamEditor($("[data-role=upstream-inline]", section));

  function fill(u) {
    for (const name of ["id", "name", "desc"]) {
      f(name).value = u[name] === undefined || u[name] === null ? "" : String(u[name]);
    }
    upstream.fill(u);
  }

  function read(base) {
    const u = upstream.read(base);
    if (!f("id").readOnly) setField(u, "id", f("id").value);
    setField(u, "name", f("name").value);
    setField(u, "desc", f("desc").value);
    return u;
  }

  const editor = new ResourceEditor(section, {
    kind: "upstreams",
    noun: "upstream",
    listHash: "#/upstreams",
    defaults: () => ({type: "chash", key: "mqtt_client_id", nodes: []}),
    load: async () => {},
    fill,
    read,
    deleteWarning: () => "Stream routes that use it by upstream_id will fail to connect to any broker.",
    confirm: ctx.confirm,
    toast: ctx.toast,
    navigate: ctx.navigate,
  });
  return editor;
}
