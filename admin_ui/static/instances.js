// The fleet's instances (/gproxy/instances): every gproxy (and APISIX) registered on
// the shared etcd, with each one's live sessions asked fresh, and sessions per
// node summed across the fleet beside each instance's share.  Polled every
// 2 s while the page is open.  On the file store the API answers for this
// instance alone, with a note, which the page shows.

import {api} from "./api.js";
import {$, h, setText, clear} from "./dom.js";
import {ago, count, dateTime, duration, naturalCompare as compare} from "./format.js";

const POLL_MS = 2000;

export function createInstances(section, ctx) {
  const tbody = $("#instances-table tbody", section);
  const nodesHead = $("#fleet-nodes thead tr", section);
  const nodesBody = $("#fleet-nodes tbody", section);
  const note = $("[data-role=fleet-note]", section);
  const summary = $("[data-role=fleet-summary]", section);
  const updated = $("[data-role=updated]", section);
  let timer = null;
  let running = false;

  function statusOf(item) {
    if (item.product !== "gproxy") return ["badge-muted", "APISIX"];
    if (item.registered === false) return ["badge-warn", "not registered"];
    if (item.reachable === false) return ["badge-warn", "not answering"];
    if (item.draining) return ["badge-warn", "draining"];
    return ["badge-ok", "serving"];
  }

  function row(item, now) {
    const [cls, label] = statusOf(item);
    const name = h("td", {className: "mono"}, item.id ?? "this instance",
      item.self ? h("span", {className: "badge badge-muted", "data-role": "self"}, "this one") : null);
    const live = item.live_sessions ?? null;
    const reported = item.reachable === false && item.reported_at ?
      h("span", {className: "muted small"}, ` reported ${ago(item.reported_at, now)}`) : null;
    return h("tr", {"data-instance": item.id ?? ""}, name,
      h("td", {}, item.hostname ?? "–"),
      h("td", {className: "mono"}, item.admin ?? "–"),
      h("td", {}, item.version ?? "–"),
      h("td", {title: item.boot_time ? `started ${dateTime(item.boot_time)}` : ""},
        item.boot_time ? duration(now - item.boot_time) : "–"),
      h("td", {className: "num", "data-role": "live"}, live === null ? "–" : count(live), reported),
      h("td", {}, h("span", {className: `badge ${cls}`, "data-role": "status"}, label)));
  }

  function renderNodes(data) {
    const gproxies = (data.list || []).filter((i) => i.product === "gproxy");
    const nodes = Object.keys(data.per_node || {}).sort(compare);
    clear(nodesHead);
    nodesHead.append(h("th", {}, "Node"), h("th", {className: "num"}, "Fleet"),
      ...gproxies.map((i) => h("th", {className: "num mono", title: i.admin || ""}, i.id ?? "this instance")));
    clear(nodesBody);
    for (const node of nodes) {
      nodesBody.append(h("tr", {"data-node": node}, h("td", {className: "mono"}, node),
        h("td", {className: "num", "data-role": "fleet-total"}, count(data.per_node[node])),
        ...gproxies.map((i) => h("td", {className: "num", "data-instance": i.id ?? ""},
          count((i.per_node || {})[node] || 0)))));
    }
    if (!nodes.length) nodesBody.append(h("tr", {}, h("td", {colSpan: 2 + gproxies.length, className: "muted"}, "No live sessions.")));
  }

  function render(data) {
    const now = Date.now() / 1000;
    clear(tbody);
    for (const item of data.list || []) tbody.append(row(item, now));
    renderNodes(data);
    const live = (data.list || []).reduce((n, i) => n + (i.live_sessions || 0), 0);
    setText(summary, `${count(data.total || 0)} instance${data.total === 1 ? "" : "s"}, ${count(live)} live sessions` +
      (data.report_ttl ? ` · an instance that stops renewing leaves within ${data.report_ttl} s` : ""));
    const missing = (data.unreachable || []).map((u) => `${u.id} (${u.error})`);
    const text = [data.note, missing.length ? `Not answering: ${missing.join(", ")}; their last reports are shown.` : ""]
      .filter(Boolean).join(" ");
    setText(note, text);
    note.hidden = !text;
  }

  async function poll() {
    clearTimeout(timer);
    if (!running) return;
    try {
      const {data} = await api("GET", "/gproxy/instances");
      if (!running) return;
      render(data || {});
      setText(updated, `Updated ${dateTime(Date.now() / 1000).slice(11)}.`);
      updated.classList.remove("stale");
    } catch (err) {
      if (running) {
        updated.classList.add("stale");
        ctx.error(`Instances not updating: ${err.message}`);
      }
    } finally {
      if (running) timer = setTimeout(poll, POLL_MS);
    }
  }

  return {
    show() {
      if (running) return;
      running = true;
      poll();
    },
    hide() {
      running = false;
      clearTimeout(timer);
    },
  };
}
