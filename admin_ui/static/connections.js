// Live connections: totals, sessions per node, and the sessions table, polled
// every second from /apisix/admin/gproxy/{sessions,stats} while the page is open.

import {api, enc, listValues} from "./api.js";
import {$, $$, h, clear, setText, setOptions} from "./dom.js";
import {ago, bytes, count, dateTime, duration, hostPort, mqttVersion, nodeList, nodeAddr} from "./format.js";

const POLL_MS = 1000;
const CONFIG_EVERY = 10;  // re-read routes/upstreams (for idle nodes, route names) every 10 polls

const COLUMNS = {
  id: (s) => sessionOrder(s.id),
  client: (s) => `${s.client_addr}\u0000${String(s.client_port).padStart(5, "0")}`,
  client_id: (s) => s.client_id ?? "",
  protocol_level: (s) => s.protocol_level ?? -1,
  transport: (s) => s.transport ?? "tcp",
  route_id: (s) => s.route_id ?? "",
  node: (s) => s.node ?? "",
  state: (s) => s.state ?? "",
  bytes_in: (s) => s.bytes_in,
  bytes_out: (s) => s.bytes_out,
  connected_at: (s) => s.connected_at,
};

// "1234-17" sorts as (1234, 17), not as text.
function sessionOrder(id) {
  const m = /^(.*)-(\d+)$/.exec(String(id));
  return m ? `${m[1]}-${m[2].padStart(12, "0")}` : String(id);
}

function compare(a, b) {
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), "en", {numeric: true});
}

export function createConnections(section, ctx) {
  const table = $("#sessions-table", section);
  const tbody = $("tbody", table);
  const empty = $("[data-role=empty]", section);
  const filterBox = $("#session-filter", section);
  const countLabel = $("[data-role=count]", section);
  const updated = $("[data-role=updated]", section);
  const bars = $("#node-bars", section);
  const barsEmpty = $("[data-role=bars-empty]", section);
  const reasons = $("[data-role=reasons]", section);
  const bulkRoute = $("#bulk-route", section);
  const bulkButton = $("#bulk-disconnect", section);

  const rows = new Map();  // session id -> <tr>, reused so clicks never hit a vanished button
  let sessions = [];
  let sort = {key: "connected_at", dir: 1};
  let timer = null;
  let running = false;
  let polls = 0;
  let routeIds = [];
  let configuredNodes = [];
  let failing = false;
  let inflight = false;
  let bulkPicked = false;
  let again = false;

  for (const th of $$("th[data-sort]", table)) {
    $("button", th).addEventListener("click", () => {
      const key = th.dataset.sort;
      sort = {key, dir: sort.key === key ? -sort.dir : 1};
      renderTable();
    });
  }
  filterBox.addEventListener("input", () => renderTable());
  bulkButton.addEventListener("click", () => disconnectRoute(bulkRoute.value));
  bulkRoute.addEventListener("change", () => { bulkPicked = true; });

  async function loadConfig() {
    try {
      const [routes, upstreams] = await Promise.all([listValues("stream_routes"), listValues("upstreams")]);
      routeIds = routes.map((r) => String(r.id));
      const nodes = new Set();
      for (const u of [...routes.map((r) => r.upstream), ...upstreams]) {
        if (u && typeof u === "object") for (const n of nodeList(u.nodes)) nodes.add(nodeAddr(n));
      }
      configuredNodes = [...nodes];
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
      const [list, stats] = await Promise.all([api("GET", "/gproxy/sessions"), api("GET", "/gproxy/stats")]);
      if (!running) return;
      sessions = (list.data && list.data.list) || [];
      renderStats(stats.data || {});
      renderBars(stats.data && stats.data.per_node);
      renderBulk();
      renderTable();
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
    const total = Object.values(rejected).reduce((a, b) => a + b, 0);
    setText($("[data-stat=rejected]", section), count(total));
    clear(reasons);
    for (const [reason, n] of Object.entries(rejected).sort((a, b) => b[1] - a[1])) {
      reasons.appendChild(h("li", {"data-reason": reason}, h("span", {className: "mono"}, reason), ` ${count(n)}`));
    }
    const since = $("[data-stat=started_at]", section);
    if (typeof st.started_at === "number") {
      setText(since, `${duration(Date.now() / 1000 - st.started_at)}`);
      since.title = `started ${dateTime(st.started_at)}`;
    }
  }

  function renderBars(perNode) {
    const counts = Object.assign({}, perNode || {});
    for (const s of sessions) if (s.node && !(s.node in counts)) counts[s.node] = 0;
    for (const n of configuredNodes) if (!(n in counts)) counts[n] = 0;
    const entries = Object.entries(counts).sort((a, b) => b[1] - a[1] || compare(a[0], b[0]));
    const max = Math.max(1, ...entries.map(([, n]) => n));
    clear(bars);
    for (const [node, n] of entries) {
      const fill = h("span", {className: "bar-fill"});
      fill.style.width = `${(100 * n) / max}%`;
      bars.appendChild(h("div", {className: "bar-row", role: "listitem", "data-node": node},
        h("span", {className: "bar-label mono", title: node}, node),
        h("span", {className: "bar-track"}, fill),
        h("span", {className: "bar-value", "data-count": String(n)}, count(n))));
    }
    barsEmpty.hidden = entries.length > 0;
  }

  function renderBulk() {
    const ids = new Set(routeIds);
    for (const s of sessions) if (s.route_id) ids.add(String(s.route_id));
    const live = {};
    for (const s of sessions) live[s.route_id] = (live[s.route_id] || 0) + 1;
    const options = [...ids].sort(compare).map((id) => [id, `${id} (${live[id] || 0} live)`]);
    // Until the user picks one, offer the route with the most live sessions.
    const busiest = [...ids].sort((x, y) => (live[y] || 0) - (live[x] || 0) || compare(x, y))[0];
    const wanted = bulkPicked && ids.has(bulkRoute.value) ? bulkRoute.value : busiest;
    const same = options.length === bulkRoute.options.length &&
      options.every(([v, label], i) => bulkRoute.options[i].value === v && bulkRoute.options[i].text === label);
    if (!same) setOptions(bulkRoute, options, wanted);
    else if (bulkRoute.value !== wanted) bulkRoute.value = wanted;
    bulkButton.disabled = !options.length;
  }

  function matches(s, needle) {
    if (!needle) return true;
    return [s.client_id, s.route_id, s.node, s.id, s.transport, hostPort(s.client_addr, s.client_port)]
      .some((v) => v !== null && v !== undefined && String(v).toLowerCase().includes(needle));
  }

  function renderTable() {
    const needle = filterBox.value.trim().toLowerCase();
    const key = COLUMNS[sort.key] || COLUMNS.connected_at;
    const shown = sessions.filter((s) => matches(s, needle))
      .sort((a, b) => sort.dir * compare(key(a), key(b)) || compare(sessionOrder(a.id), sessionOrder(b.id)));
    const keep = new Set(shown.map((s) => s.id));
    for (const [id, tr] of rows) {
      if (!keep.has(id)) { tr.remove(); rows.delete(id); }
    }
    for (const s of shown) {
      let tr = rows.get(s.id);
      if (!tr) { tr = newRow(s); rows.set(s.id, tr); }
      updateRow(tr, s);
      tbody.appendChild(tr);  // moves it into sorted place
    }
    for (const th of $$("th[data-sort]", table)) {
      if (th.dataset.sort === sort.key) th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    empty.hidden = shown.length > 0;
    setText(empty, sessions.length ? "No session matches the filter." : "No live sessions.");
    const total = sessions.length;
    setText(countLabel, shown.length === total ? `${total} live` : `${shown.length} of ${total} live`);
  }

  const FIELDS = ["id", "client", "client_id", "protocol_level", "transport", "route_id", "node", "state",
    "bytes_in", "bytes_out", "connected_at"];

  function newRow(s) {
    const cells = FIELDS.map((name) => h("td", {"data-col": name,
      className: ["bytes_in", "bytes_out"].includes(name) ? "num" : ["id", "client", "client_id", "node", "route_id"].includes(name) ? "mono" : ""}));
    const button = h("button", {type: "button", className: "btn btn-small btn-danger-outline",
      "data-action": "disconnect", onclick: () => disconnect(s.id, tr)}, "Disconnect");
    const tr = h("tr", {"data-session": s.id}, cells, h("td", {className: "row-actions"}, button));
    return tr;
  }

  function updateRow(tr, s) {
    tr.dataset.clientId = s.client_id ?? "";
    tr.dataset.node = s.node ?? "";
    tr.dataset.route = s.route_id ?? "";
    const cell = (name) => tr.querySelector(`td[data-col=${name}]`);
    setText(cell("id"), s.id);
    setText(cell("client"), hostPort(s.client_addr, s.client_port));
    const cid = cell("client_id");
    setText(cid, s.client_id === null || s.client_id === undefined ? "–" : s.client_id === "" ? "(empty)" : s.client_id);
    cid.classList.toggle("muted", !s.client_id);
    setText(cell("protocol_level"), mqttVersion(s.protocol_level));
    // tcp: raw MQTT; ws: MQTT over WebSocket (bytes are MQTT bytes when gproxy unwraps)
    setText(cell("transport"), s.transport ?? "tcp");
    setText(cell("route_id"), s.route_id ?? "–");
    setText(cell("node"), s.node ?? "–");
    const state = cell("state");
    setText(state, s.state);
    state.className = `state state-${String(s.state).replace(/[^a-z]/g, "")}`;
    setText(cell("bytes_in"), bytes(s.bytes_in));
    cell("bytes_in").title = `${count(s.bytes_in)} bytes`;
    setText(cell("bytes_out"), bytes(s.bytes_out));
    cell("bytes_out").title = `${count(s.bytes_out)} bytes`;
    setText(cell("connected_at"), ago(s.connected_at));
    cell("connected_at").title = dateTime(s.connected_at);
  }

  async function disconnect(id, tr) {
    tr.classList.add("closing");
    const button = tr.querySelector("[data-action=disconnect]");
    button.disabled = true;
    try {
      await api("DELETE", `/gproxy/sessions/${enc(id)}`);
      ctx.toast(`Session ${id} disconnected.`);
    } catch (err) {
      tr.classList.remove("closing");
      button.disabled = false;
      ctx.error(err.status === 404 ? `Session ${id} had already ended.` : `Could not disconnect ${id}: ${err.message}`);
    }
    refresh();
  }

  async function disconnectRoute(routeId) {
    if (!routeId) return;
    const n = sessions.filter((s) => String(s.route_id) === routeId).length;
    const ok = await ctx.confirm(`Disconnect route ${routeId}?`,
      `Close all ${n} live session${n === 1 ? "" : "s"} of stream route ${routeId}. MQTT clients usually reconnect.`,
      "Disconnect all");
    if (!ok) return;
    try {
      const {data} = await api("DELETE", `/gproxy/sessions?route_id=${enc(routeId)}`);
      const closed = (data && data.closed) || [];
      ctx.toast(`Closed ${closed.length} session${closed.length === 1 ? "" : "s"} of route ${routeId}.`);
    } catch (err) {
      ctx.error(`Could not disconnect route ${routeId}: ${err.message}`);
    }
    refresh();
  }

  function refresh() {
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
