// Live connections: totals and sessions per node from the registry's counters
// (/gproxy/stats), and one page of sessions at a time (/gproxy/sessions with
// page, page_size, filters and sort done by gproxy), polled every second while
// the page is open.  Rows are keyed by session id and updated in place, so a
// poll touches only the text that changed and never renders more than a page.
// "Whole fleet" asks with fleet=true: every instance's sessions (each row names
// its instance), the fleet's sessions per node (/gproxy/instances), and drains,
// moves and disconnects that reach every instance.

import {api, enc, listValues} from "./api.js";
import {$, $$, h, setText, setOptions} from "./dom.js";
import {ago, bytes, count, dateTime, duration, hostPort, mqttVersion, naturalCompare as compare} from "./format.js";
import {createNodes, healthByNode} from "./nodes.js";

const POLL_MS = 1000;
const CONFIG_EVERY = 5;  // re-read routes/upstreams and what would move every 5 polls

export function createConnections(section, ctx) {
  const table = $("#sessions-table", section);
  const tbody = $("tbody", table);
  const empty = $("[data-role=empty]", section);
  const filterBox = $("#session-filter", section);
  const nodeSel = $("#filter-node", section);
  const routeSel = $("#filter-route", section);
  const stateSel = $("#filter-state", section);
  const countLabel = $("[data-role=count]", section);
  const pageLabel = $("[data-role=page]", section);
  const prev = $("#page-prev", section);
  const next = $("#page-next", section);
  const sizeSel = $("#page-size", section);
  const updated = $("[data-role=updated]", section);
  const reasons = $("[data-role=reasons]", section);
  const bulkRoute = $("#bulk-route", section);
  const bulkButton = $("#bulk-disconnect", section);
  const fleetBox = $("#fleet-wide", section);
  const nodes = createNodes($(".chart-card", section), ctx, (now) => { if (now) polls = 0; poll(); },
    () => fleetBox.checked);

  const rows = new Map();  // session id -> <tr>, reused so clicks never hit a vanished button
  const cellsOf = new WeakMap();  // <tr> -> {column name: <td>}
  let sort = {key: "connected_at", dir: 1};
  let page = 1;
  let total = 0;
  let perRoute = {};
  let timer = null;
  let running = false;
  let polls = 0;
  let routeIds = [];
  let failing = false;
  let inflight = false;
  let bulkPicked = false;
  let again = false;
  let selfId = null;  // this instance's id in the fleet (rows of others end through the fleet)
  let unreachable = [];

  for (const th of $$("th[data-sort]", table)) {
    $("button", th).addEventListener("click", () => {
      const key = th.dataset.sort;
      sort = {key, dir: sort.key === key ? -sort.dir : 1};
      page = 1;
      poll();
    });
  }
  const refilter = () => { page = 1; poll(); };
  filterBox.addEventListener("input", refilter);
  fleetBox.addEventListener("change", () => {
    table.classList.toggle("fleet", fleetBox.checked);
    polls = 0;
    refilter();
  });
  for (const sel of [nodeSel, routeSel, stateSel, sizeSel]) sel.addEventListener("change", refilter);
  prev.addEventListener("click", () => { if (page > 1) { page -= 1; poll(); } });
  next.addEventListener("click", () => { if (page < pages()) { page += 1; poll(); } });
  bulkButton.addEventListener("click", () => disconnectRoute(bulkRoute.value));
  bulkRoute.addEventListener("change", () => { bulkPicked = true; });

  function pageSize() { return Number(sizeSel.value) || 50; }
  function pages() { return Math.max(1, Math.ceil(total / pageSize())); }

  const fleetArg = () => (fleetBox.checked ? "&fleet=true" : "");

  function query() {
    const q = [`page=${page}`, `page_size=${pageSize()}`, `sort=${sort.dir < 0 ? "-" : ""}${sort.key}`];
    if (fleetBox.checked) q.push("fleet=true");
    const needle = filterBox.value.trim();
    if (needle) q.push(`client_id=${enc(needle)}`);
    if (nodeSel.value) q.push(`node=${enc(nodeSel.value)}`);
    if (routeSel.value) q.push(`route_id=${enc(routeSel.value)}`);
    if (stateSel.value) q.push(`state=${enc(stateSel.value)}`);
    return q.join("&");
  }

  async function loadConfig() {
    try {
      const [routes, upstreams, moving] = await Promise.all([listValues("stream_routes"),
        listValues("upstreams"), api("GET", `/gproxy/sessions?misplaced=true&page_size=10${fleetArg()}`)]);
      routeIds = routes.map((r) => String(r.id));
      nodes.setConfig({routes, upstreams});
      nodes.setMisplaced(moving.data || {});
    } catch (_) { /* the poll shows API errors */ }
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    if (!running) return;
    if (inflight) { again = true; return; }
    inflight = true;
    try {
      if (polls % CONFIG_EVERY === 0) await loadConfig();
      polls += 1;
      const [list, stats, health, fleet] = await Promise.all([api("GET", `/gproxy/sessions?${query()}`),
        api("GET", "/gproxy/stats"), api("GET", "/gproxy/health"),
        fleetBox.checked ? api("GET", "/gproxy/instances") : null]);
      if (!running) return;
      const st = Object.assign({}, stats.data || {});
      if (fleet) {  // the fleet's totals; the other cards stay this instance's
        selfId = fleet.data.self ?? null;
        st.per_node = fleet.data.per_node || {};
        st.live_sessions = (fleet.data.list || []).reduce((n, i) => n + (i.live_sessions || 0), 0);
      }
      perRoute = st.per_route || {};
      renderStats(st);
      nodes.render(st.per_node, healthByNode(health.data && health.data.list));
      renderFilters(st.per_node || {});
      renderBulk();
      renderTable(list.data || {});
      if (await nodes.pollJobs()) polls = 0;  // re-read what would move on the next poll
      setText(updated, `Updated ${dateTime(Date.now() / 1000).slice(11)}.`);
      updated.classList.remove("stale");
      if (failing) ctx.clearError();
      failing = false;
    } catch (err) {
      if (running) {
        failing = true;
        updated.classList.add("stale");
        ctx.error(`Live data not updating: ${err.message}`);
      }
    } finally {
      inflight = false;
      if (running && again) { again = false; poll(); }
      else if (running) timer = setTimeout(poll, POLL_MS);
    }
  }

  function renderStats(st) {
    setText($("[data-stat=live_sessions]", section), count(st.live_sessions));
    setText($("[data-stat=sessions_total]", section), count(st.sessions_total));
    setText($("[data-stat=bytes_in]", section), bytes(st.bytes_in));
    setText($("[data-stat=bytes_out]", section), bytes(st.bytes_out));
    const rejected = st.rejected || {};
    setText($("[data-stat=rejected]", section), count(Object.values(rejected).reduce((a, b) => a + b, 0)));
    const items = Object.entries(rejected).sort((a, b) => b[1] - a[1]);
    const same = items.length === reasons.children.length &&
      items.every(([r, n], i) => reasons.children[i].dataset.reason === r && reasons.children[i].dataset.n === String(n));
    if (!same) {
      reasons.replaceChildren(...items.map(([reason, n]) => h("li", {"data-reason": reason, "data-n": String(n)},
        h("span", {className: "mono"}, reason), ` ${count(n)}`)));
    }
    const since = $("[data-stat=started_at]", section);
    if (typeof st.started_at === "number") {
      setText(since, `${duration(Date.now() / 1000 - st.started_at)}`);
      since.title = `started ${dateTime(st.started_at)}`;
    }
  }

  function keepOptions(select, values, allLabel) {
    const options = [["", allLabel], ...values.map((v) => [v, v])];
    const same = options.length === select.options.length && options.every(([v], i) => select.options[i].value === v);
    if (!same) setOptions(select, options);
  }

  function renderFilters(perNode) {
    const nodeNames = new Set([...Object.keys(perNode), ...nodes.nodes]);
    if (nodeSel.value) nodeNames.add(nodeSel.value);
    keepOptions(nodeSel, [...nodeNames].sort(compare), "All nodes");
    const routes = new Set([...routeIds, ...Object.keys(perRoute)]);
    if (routeSel.value) routes.add(routeSel.value);
    keepOptions(routeSel, [...routes].sort(compare), "All routes");
  }

  function renderBulk() {
    const ids = new Set([...routeIds, ...Object.keys(perRoute)]);
    const live = (id) => perRoute[id] || 0;
    const options = [...ids].sort(compare).map((id) => [id, `${id} (${live(id)} live)`]);
    // Until the user picks one, offer the route with the most live sessions.
    const busiest = [...ids].sort((x, y) => live(y) - live(x) || compare(x, y))[0];
    const wanted = bulkPicked && ids.has(bulkRoute.value) ? bulkRoute.value : busiest;
    const same = options.length === bulkRoute.options.length &&
      options.every(([v, label], i) => bulkRoute.options[i].value === v && bulkRoute.options[i].text === label);
    if (!same) setOptions(bulkRoute, options, wanted);
    else if (bulkRoute.value !== wanted) bulkRoute.value = wanted;
    bulkButton.disabled = !options.length;
  }

  function renderTable(data) {
    const list = data.list || [];
    total = data.total || 0;
    unreachable = (data.unreachable || []).map((u) => u.id);
    if (page > pages() && total) { page = pages(); poll(); return; }
    const keep = new Set(list.map((s) => s.id));
    for (const [id, tr] of rows) {
      if (!keep.has(id)) { tr.remove(); rows.delete(id); }
    }
    const now = typeof data.now === "number" ? data.now : Date.now() / 1000;
    list.forEach((s, i) => {
      let tr = rows.get(s.id);
      if (!tr) { tr = newRow(s); rows.set(s.id, tr); }
      updateRow(tr, s, now);
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    for (const th of $$("th[data-sort]", table)) {
      if (th.dataset.sort === sort.key) th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    empty.hidden = list.length > 0;
    const filtered = filterBox.value.trim() || nodeSel.value || routeSel.value || stateSel.value;
    setText(empty, filtered ? "No session matches the filter." : "No live sessions.");
    const first = (page - 1) * pageSize();
    setText(countLabel, `${count(total)} ${filtered ? "matching" : "live"}` +
      (data.note ? ` · ${data.note}` : "") +
      (unreachable.length ? ` · not answering: ${unreachable.join(", ")}` : ""));
    setText(pageLabel, total ? `${count(first + 1)}–${count(first + list.length)} of ${count(total)} · page ${page} of ${pages()}` : "");
    prev.disabled = page <= 1;
    next.disabled = page >= pages();
  }

  const FIELDS = ["id", "instance", "client", "client_id", "username", "tls_client_cn", "protocol_level",
    "transport", "route_id", "node", "state", "bytes_in", "bytes_out", "connected_at"];
  const MONO = ["id", "instance", "client", "client_id", "username", "tls_client_cn", "node", "route_id"];

  function newRow(s) {
    const cells = FIELDS.map((name) => h("td", {"data-col": name,
      className: ["bytes_in", "bytes_out"].includes(name) ? "num" : MONO.includes(name) ? "mono" : ""}));
    const button = h("button", {type: "button", className: "btn btn-small btn-danger-outline",
      "data-action": "disconnect", onclick: () => disconnect(s.id, tr)}, "Disconnect");
    const tr = h("tr", {"data-session": s.id}, cells, h("td", {className: "row-actions"}, button));
    cellsOf.set(tr, Object.fromEntries(FIELDS.map((name, i) => [name, cells[i]])));
    return tr;
  }

  function updateRow(tr, s, now) {
    const c = cellsOf.get(tr);
    tr.dataset.clientId = s.client_id ?? "";
    tr.dataset.node = s.node ?? "";
    tr.dataset.route = s.route_id ?? "";
    setText(c.id, s.id);
    setText(c.instance, s.instance ?? "");
    tr.dataset.instance = s.instance ?? "";
    setText(c.client, hostPort(s.client_addr, s.client_port));
    setText(c.client_id, s.client_id === null || s.client_id === undefined ? "–" : s.client_id === "" ? "(empty)" : s.client_id);
    c.client_id.classList.toggle("muted", !s.client_id);
    for (const name of ["username", "tls_client_cn"]) {  // never a password: the API has none
      setText(c[name], s[name] === null || s[name] === undefined ? "–" : s[name] === "" ? "(empty)" : s[name]);
      c[name].classList.toggle("muted", !s[name]);
    }
    c.tls_client_cn.title = s.sni ? `TLS server name: ${s.sni}` : "plain TCP";
    setText(c.protocol_level, mqttVersion(s.protocol_level));
    // tcp: raw MQTT; ws: MQTT over WebSocket (bytes are MQTT bytes when gproxy unwraps)
    setText(c.transport, s.transport ?? "tcp");
    setText(c.route_id, s.route_id ?? "–");
    setText(c.node, s.node ?? "–");
    setText(c.state, s.state);
    const stateClass = `state state-${String(s.state).replace(/[^a-z]/g, "")}`;
    if (c.state.className !== stateClass) c.state.className = stateClass;
    setText(c.bytes_in, bytes(s.bytes_in));
    setText(c.bytes_out, bytes(s.bytes_out));
    setText(c.connected_at, ago(s.connected_at, now));
    if (tr.dataset.at !== String(s.connected_at)) {  // titles only for new rows
      tr.dataset.at = String(s.connected_at);
      c.connected_at.title = dateTime(s.connected_at);
    }
    c.bytes_in.title = `${count(s.bytes_in)} bytes`;
    c.bytes_out.title = `${count(s.bytes_out)} bytes`;
  }

  async function disconnect(id, tr) {
    tr.classList.add("closing");
    const button = tr.querySelector("[data-action=disconnect]");
    button.disabled = true;
    try {
      const other = tr.dataset.instance && tr.dataset.instance !== String(selfId);
      if (other) await api("DELETE", `/gproxy/sessions?ids=${enc(id)}&fleet=true`);  // ended cleanly where it lives
      else await api("DELETE", `/gproxy/sessions/${enc(id)}`);
      ctx.toast(`Session ${id} disconnected.`);
    } catch (err) {
      tr.classList.remove("closing");
      button.disabled = false;
      ctx.error(err.status === 404 ? `Session ${id} had already ended.` : `Could not disconnect ${id}: ${err.message}`);
    }
    poll();
  }

  async function disconnectRoute(routeId) {
    if (!routeId) return;
    const n = perRoute[routeId] || 0;
    const ok = await ctx.confirm(`Disconnect route ${routeId}?`,
      `Close all ${n} live session${n === 1 ? "" : "s"} of stream route ${routeId} cleanly (the broker gets a DISCONNECT, ` +
      `so no Will is published). MQTT clients usually reconnect.`, "Disconnect all");
    if (!ok) return;
    try {
      const {data} = await api("DELETE", `/gproxy/sessions?route_id=${enc(routeId)}${fleetArg()}`);
      ctx.toast(`Closing ${data.total} session${data.total === 1 ? "" : "s"} of route ${routeId}.`);
    } catch (err) {
      ctx.error(`Could not disconnect route ${routeId}: ${err.message}`);
    }
    poll();
  }

  return {
    show() {
      if (running) return;
      running = true;
      polls = 0;
      poll();
    },
    hide() {
      running = false;
      clearTimeout(timer);
      timer = null;
    },
  };
}
