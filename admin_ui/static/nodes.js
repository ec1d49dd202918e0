// Sessions per node (from the registry's counters) with each node's health-check
// status (/gproxy/health), and what an operator does
// to a node: Drain (weight 0 through the Admin API, APISIX's own way, then
// evict its sessions at a rate), Undrain (the weight back, kept in the node's
// metadata as gproxy_weight), and Move for sessions a ring change misplaced.
// Every change goes through the Admin API; evictions are followed by their id.

import {api, enc, listValues} from "./api.js";
import {$, h, setText} from "./dom.js";
import {count, nodeAddr, nodeList} from "./format.js";

const KEEP = "gproxy_weight";  // the node metadata key holding a drained node's weight

// Where a node appears: [{kind: "upstream"|"route", value, node}]
function occurrences(config, addr) {
  const out = [];
  for (const u of config.upstreams) {
    for (const n of nodeList(u.nodes)) if (nodeAddr(n) === addr) out.push({kind: "upstream", value: u, node: n});
  }
  for (const r of config.routes) {
    if (!r.upstream || typeof r.upstream !== "object") continue;
    for (const n of nodeList(r.upstream.nodes)) if (nodeAddr(n) === addr) out.push({kind: "route", value: r, node: n});
  }
  return out;
}

function kept(node) {
  return node.metadata && typeof node.metadata[KEEP] === "number" ? node.metadata[KEEP] : null;
}

// The upstream's nodes (array form) with ``addr`` drained or restored.
function rewrite(nodes, addr, drain) {
  return nodeList(nodes).map((n) => {
    if (nodeAddr(n) !== addr) return n;
    const out = Object.assign({}, n);
    if (drain && n.weight > 0) {
      out.metadata = Object.assign({}, n.metadata || {}, {[KEEP]: n.weight});
      out.weight = 0;
    } else if (!drain && kept(n) !== null) {
      out.weight = kept(n);
      const meta = Object.assign({}, n.metadata);
      delete meta[KEEP];
      if (Object.keys(meta).length) out.metadata = meta; else delete out.metadata;
    }
    return out;
  });
}

// Write every upstream (PATCH) and inline route upstream (PUT) that lists ``addr``.
async function setWeights(addr, drain) {
  const [routes, upstreams] = await Promise.all([listValues("stream_routes"), listValues("upstreams")]);
  let changed = 0;
  for (const o of occurrences({routes, upstreams}, addr)) {
    if (drain ? !(o.node.weight > 0) : kept(o.node) === null) continue;
    if (o.kind === "upstream") {
      await api("PATCH", `/upstreams/${enc(String(o.value.id))}`, {nodes: rewrite(o.value.nodes, addr, drain)});
    } else {
      const body = Object.assign({}, o.value);
      delete body.create_time;
      delete body.update_time;
      body.upstream = Object.assign({}, o.value.upstream, {nodes: rewrite(o.value.upstream.nodes, addr, drain)});
      await api("PUT", `/stream_routes/${enc(String(o.value.id))}`, body);
    }
    changed += 1;
  }
  return changed;
}

// "ip:port" -> the worst status any health checker (GET /gproxy/health) reports.
const WORST = ["healthy", "mostly_healthy", "mostly_unhealthy", "unhealthy"];
export function healthByNode(checkers) {
  const out = {};
  for (const checker of checkers || []) {
    for (const n of checker.nodes || []) {
      const addr = String(n.ip).includes(":") ? `[${n.ip}]:${n.port}` : `${n.ip}:${n.port}`;
      if (!(addr in out) || WORST.indexOf(n.status) > WORST.indexOf(out[addr])) out[addr] = n.status;
    }
  }
  return out;
}

export function createNodes(card, ctx, refresh, fleetWide = () => false) {
  const bars = $("#node-bars", card);
  const barsEmpty = $("[data-role=bars-empty]", card);
  const misplacedText = $("[data-role=misplaced]", card);
  const rebalance = $("#rebalance", card);
  const rateBox = $("#evict-rate", card);
  const jobsList = $("#evictions", card);
  const rows = new Map();  // node -> {row, fill, value, notes, ...}
  const jobs = new Map();  // eviction id -> {label, li, data}
  let config = {routes: [], upstreams: []};
  let misplaced = {total: 0, per_node: {}};

  rebalance.addEventListener("click", () => move(null));

  function rate() {
    const n = Number(rateBox.value);
    return n > 0 ? n : null;
  }

  function evictQuery(extra) {
    const r = rate();
    return `/gproxy/sessions?${extra}${r ? `&rate=${r}` : ""}${fleetWide() ? "&fleet=true" : ""}`;
  }

  async function evict(extra, label) {
    const {data} = await api("DELETE", evictQuery(extra));
    follow(data, data.fleet ? `${label} (whole fleet)` : label);
    return data;
  }

  function follow(job, label) {
    const li = h("li", {"data-eviction": job.id});
    jobsList.prepend(li);
    jobs.set(job.id, {label, li, data: job});
    renderJob(jobs.get(job.id));
  }

  function renderJob(j) {
    const d = j.data;
    const pace = d.rate ? `${count(d.rate)}/s` : "at once";
    setText(j.li, `${j.label}: ${count(d.done)} of ${count(d.total)} closed (${pace}) — ${d.state}`);
    j.li.dataset.state = d.state;
  }

  // Follow running evictions; true when one finished (what would move has changed).
  async function pollJobs() {
    let ended = false;
    for (const j of jobs.values()) {
      if (j.data.state !== "running") continue;
      try {
        j.data = (await api("GET", `/gproxy/evictions/${enc(j.data.id)}`)).data;
      } catch (_) { j.data = Object.assign({}, j.data, {state: "unknown"}); }
      renderJob(j);
      ended = ended || j.data.state !== "running";
    }
    const finished = [...jobs.values()].filter((j) => j.data.state !== "running");
    for (const j of finished.slice(0, Math.max(0, finished.length - 5))) {
      j.li.remove();
      jobs.delete(j.data.id);
    }
    return ended;
  }

  async function drain(addr, live) {
    const r = rate();
    const ok = await ctx.confirm(`Drain ${addr}?`,
      `Its weight becomes 0 in every upstream that lists it (new clients go to the other nodes; ` +
      `the old weight is kept in the node's metadata for Undrain), then its ${count(live)} live ` +
      `session${live === 1 ? "" : "s"} are closed ${r ? `at ${count(r)} per second` : "at once"}: ` +
      `each broker gets a DISCONNECT (no Will), MQTT 5 clients are told to use another server.`, "Drain");
    if (!ok) return;
    try {
      const n = await setWeights(addr, true);
      const job = await evict(`node=${enc(addr)}`, `Draining ${addr}`);
      ctx.toast(`${addr}: weight 0 in ${n} place${n === 1 ? "" : "s"}; closing ${count(job.total)} sessions.`);
    } catch (err) {
      ctx.error(`Could not drain ${addr}: ${err.message}`);
    }
    refresh(true);
  }

  async function undrain(addr) {
    try {
      const n = await setWeights(addr, false);
      ctx.toast(`${addr}: weight restored in ${n} place${n === 1 ? "" : "s"}.`);
    } catch (err) {
      ctx.error(`Could not undrain ${addr}: ${err.message}`);
    }
    refresh(true);
  }

  async function move(addr) {
    const n = addr ? misplaced.per_node[addr] || 0 : misplaced.total;
    const ok = await ctx.confirm(`Move ${count(n)} session${n === 1 ? "" : "s"}?`,
      `Their route's upstream now picks another node for them. They are closed cleanly ` +
      `${rate() ? `at ${count(rate())} per second` : "at once"} and land on their new node when they reconnect.`, "Move");
    if (!ok) return;
    try {
      await evict(`misplaced=true${addr ? `&node=${enc(addr)}` : ""}`, addr ? `Moving from ${addr}` : "Rebalancing");
    } catch (err) {
      ctx.error(`Could not move sessions: ${err.message}`);
    }
    refresh(true);
  }

  function newRow(node) {
    const r = {};
    r.fill = h("span", {className: "bar-fill"});
    r.value = h("span", {className: "bar-value", "data-count": "0"});
    r.health = h("span", {className: "bar-health"});
    r.badge = h("span", {className: "badge badge-warn", "data-role": "drained", hidden: true}, "drained");
    r.moves = h("span", {className: "badge badge-muted", "data-role": "would-move", hidden: true});
    r.moveBtn = h("button", {type: "button", className: "btn btn-small", "data-action": "move", hidden: true,
      onclick: () => move(node)}, "Move");
    r.drainBtn = h("button", {type: "button", className: "btn btn-small btn-danger-outline", "data-action": "drain",
      onclick: () => drain(node, Number(r.value.dataset.count))}, "Drain");
    r.undrainBtn = h("button", {type: "button", className: "btn btn-small", "data-action": "undrain", hidden: true,
      onclick: () => undrain(node)}, "Undrain");
    r.row = h("div", {className: "bar-row", role: "listitem", "data-node": node},
      h("span", {className: "bar-label mono", title: node}, node),
      h("span", {className: "bar-track"}, r.fill), r.value, r.health,
      h("span", {className: "bar-notes"}, r.badge, r.moves, r.moveBtn, r.drainBtn, r.undrainBtn));
    return r;
  }

  function renderHealth(r, status) {
    if (r.health.dataset.health === status) return;
    r.health.dataset.health = status;
    r.health.className = `bar-health health-${status}`;
    r.health.title = status === "unchecked" ? "no health check on this node's upstream" : `health check: ${status}`;
    setText(r.health, status === "unchecked" ? "not checked" : status.replace("_", " "));
  }

  // ``health``: "ip:port" -> status, from the health checkers (see healthByNode).
  function render(perNode, health = {}) {
    const counts = Object.assign({}, perNode || {});
    for (const n of Object.keys(health)) if (!(n in counts)) counts[n] = 0;
    const configured = new Set();
    for (const u of [...config.routes.map((x) => x.upstream), ...config.upstreams]) {
      if (u && typeof u === "object") for (const n of nodeList(u.nodes)) configured.add(nodeAddr(n));
    }
    for (const n of configured) if (!(n in counts)) counts[n] = 0;
    const entries = Object.entries(counts).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    const max = Math.max(1, ...entries.map(([, n]) => n));
    for (const [node, r] of rows) if (!(node in counts)) { r.row.remove(); rows.delete(node); }
    entries.forEach(([node, n], i) => {
      let r = rows.get(node);
      if (!r) { r = newRow(node); rows.set(node, r); }
      if (bars.children[i] !== r.row) bars.insertBefore(r.row, bars.children[i] || null);
      r.fill.style.width = `${(100 * n) / max}%`;
      r.value.dataset.count = String(n);
      setText(r.value, count(n));
      renderHealth(r, health[node] || "unchecked");
      const occ = occurrences(config, node);
      const drained = occ.length > 0 && occ.every((o) => !(o.node.weight > 0)) && occ.some((o) => kept(o.node) !== null);
      r.row.classList.toggle("drained", drained);
      r.badge.hidden = !drained;
      r.undrainBtn.hidden = !occ.some((o) => kept(o.node) !== null);
      r.drainBtn.hidden = !occ.some((o) => o.node.weight > 0);
      const m = misplaced.per_node[node] || 0;
      r.moves.hidden = r.moveBtn.hidden = m === 0;
      setText(r.moves, `${count(m)} would move`);
    });
    barsEmpty.hidden = entries.length > 0;
    misplacedText.hidden = rebalance.hidden = !misplaced.total;
    setText(misplacedText, `${count(misplaced.total)} session${misplaced.total === 1 ? "" : "s"} would move`);
  }

  return {
    setConfig(c) { config = c; },
    setMisplaced(m) { misplaced = {total: m.total || 0, per_node: m.per_node || {}}; },
    render,
    pollJobs,
    get nodes() { return [...rows.keys()]; },
  };
}
