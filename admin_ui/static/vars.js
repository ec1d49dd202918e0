// The route form's "chosen by the CONNECT" part: mqtt-proxy's vars, priority and
// traffic_split (gproxy extensions, docs/routing.md).
//
// A rule that is a plain list of conditions (all must hold) is edited as rows:
// variable, "not", operator, value. Anything else (OR, nesting, "has") is edited
// as JSON, so the form never rewrites a rule it cannot show. The Admin API judges
// every value; the form only shapes it (lists for "in"/"ipmatch", numbers for
// the ordering operators).

import {ApiError} from "./api.js";
import {$, h, clear, setOptions} from "./dom.js";
import {setField, numberOrText} from "./editor.js";

export const VARIABLES = ["mqtt_username", "mqtt_client_id", "mqtt_protocol_level",
  "mqtt_protocol_name", "tls_client_cn", "sni", "remote_addr", "server_addr", "server_port"];
const OPERATORS = ["==", "~=", "~~", "~*", "in", ">", ">=", "<", "<=", "ipmatch"];
const LISTS = new Set(["in", "ipmatch"]);
const NUMBERS = new Set([">", ">=", "<", "<="]);

// [name, op, value] or [name, "!", op, value] with a value the rows can show; else null.
function simple(cond) {
  if (!Array.isArray(cond) || (cond.length !== 3 && cond.length !== 4)) return null;
  const negated = cond.length === 4;
  if (negated && cond[1] !== "!") return null;
  const [name, op, value] = negated ? [cond[0], cond[2], cond[3]] : cond;
  if (typeof name !== "string" || typeof op !== "string" || !OPERATORS.includes(op)) return null;
  const ok = LISTS.has(op) ? (Array.isArray(value) ? value.every((v) => typeof v === "string")
    : typeof value === "string") : (typeof value === "string" || typeof value === "number");
  return ok ? {name, negated, op, value} : null;
}

function rowsOf(rule) {
  if (rule === undefined) return [];
  if (!Array.isArray(rule)) return null;
  const rows = rule.map(simple);
  return rows.every(Boolean) ? rows : null;
}

// A short text for the routes list: "mqtt_username == tenant-a and ...".
export function varsText(rule) {
  const rows = rowsOf(rule);
  if (!rows) return `vars ${JSON.stringify(rule)}`;
  return rows.map((r) => `${r.name} ${r.negated ? "!" : ""}${r.op} ${
    Array.isArray(r.value) ? r.value.join(",") : r.value}`).join(" and ");
}

export class VarsEditor {
  constructor(root) {
    this.root = root;
    this.tbody = $("table.conditions tbody", root);
    this.priority = $("input[name=priority]", root);
    this.jsonBox = $("[data-role=vars-json]", root);
    this.json = $("textarea[name=vars_json]", root);
    this.rowsBox = $("[data-role=vars-rows]", root);
    $("[data-role=add-condition]", root).addEventListener("click", () => {
      const row = this.addRow({name: "mqtt_username", op: "==", value: ""});
      $("[data-c=value]", row).focus();
    });
    $("[data-role=vars-as-json]", root).addEventListener("click", () => this.asJson());
  }

  addRow(cond) {
    const name = h("select", {"data-c": "name", "aria-label": "variable"});
    setOptions(name, (VARIABLES.includes(cond.name) ? VARIABLES : [cond.name, ...VARIABLES])
      .map((v) => [v, v]), cond.name);
    const op = h("select", {"data-c": "op", "aria-label": "operator"});
    setOptions(op, OPERATORS.map((v) => [v, v]), cond.op);
    const value = Array.isArray(cond.value) ? cond.value.join(", ") : String(cond.value);
    const row = h("tr", {},
      h("td", {}, name),
      h("td", {className: "center"}, h("input", {type: "checkbox", "data-c": "not",
        "aria-label": "not", title: "not: reverse the operator", checked: cond.negated})),
      h("td", {}, op),
      h("td", {}, h("input", {"data-c": "value", value, spellcheck: "false",
        "aria-label": "value", placeholder: "tenant-a, or a,b for in / ipmatch"})),
      h("td", {className: "row-actions"}, h("button", {type: "button",
        className: "btn btn-small btn-icon", title: "remove this condition",
        "aria-label": "remove condition", onclick: () => row.remove()}, "×")));
    this.tbody.appendChild(row);
    return row;
  }

  fill(conf) {
    this.priority.value = conf.priority === undefined ? "" : String(conf.priority);
    clear(this.tbody);
    const rows = rowsOf(conf.vars);
    this.showJson(rows === null);
    if (rows === null) this.json.value = JSON.stringify(conf.vars, null, 1);
    else for (const r of rows) this.addRow(r);
  }

  showJson(on) {
    this.jsonBox.hidden = !on;
    this.rowsBox.hidden = on;
  }

  asJson() {
    const rule = this.readRows();
    this.json.value = rule === undefined ? "" : JSON.stringify(rule, null, 1);
    this.showJson(true);
  }

  readRows() {
    const rule = [];
    for (const row of this.tbody.rows) {
      const get = (c) => $(`[data-c=${c}]`, row);
      const op = get("op").value;
      const text = get("value").value.trim();
      let value = text;
      if (LISTS.has(op)) value = text.split(",").map((v) => v.trim()).filter(Boolean);
      else if (NUMBERS.has(op)) value = numberOrText(text);
      const cond = get("not").checked ? [get("name").value, "!", op, value]
        : [get("name").value, op, value];
      rule.push(cond);
    }
    return rule.length ? rule : undefined;
  }

  // The mqtt-proxy conf with the form's vars and priority laid over it.
  read(conf) {
    setField(conf, "priority", this.priority.value, numberOrText);
    let rule;
    if (!this.jsonBox.hidden) {
      const text = this.json.value.trim();
      try {
        rule = text ? JSON.parse(text) : undefined;
      } catch (err) {
        throw new ApiError(0, null, `invalid JSON in vars: ${err.message}`);
      }
    } else {
      rule = this.readRows();
    }
    if (rule === undefined) delete conf.vars;
    else conf.vars = rule;
    return conf;
  }
}

// The canary part: one upstream taking an integer percent of the clients, sticky by
// client id. Another shape of traffic_split stays as it is (JSON view edits it).
export class SplitEditor {
  constructor(root) {
    this.select = $("select[name=canary_upstream]", root);
    this.percent = $("input[name=canary_percent]", root);
    this.note = $("[data-role=split-note]", root);
    this.fields = $("[data-role=split-fields]", root);
  }

  static simple(split) {
    const list = split && split.weighted_upstreams;
    if (!Array.isArray(list) || list.length !== 2) return null;
    const [canary, own] = list;
    if (!canary || canary.upstream_id === undefined || !own || own.upstream_id !== undefined) return null;
    const w = canary.weight === undefined ? 1 : canary.weight;
    const rest = own.weight === undefined ? 1 : own.weight;
    return w + rest === 100 ? {upstream: String(canary.upstream_id), percent: w} : null;
  }

  fill(conf, upstreams) {
    const split = conf.traffic_split;
    const shown = split === undefined ? {upstream: "", percent: ""} : SplitEditor.simple(split);
    this.fields.hidden = shown === null;
    this.note.hidden = shown !== null;
    const options = [["", "no canary"], ...upstreams.map((u) => [String(u.id),
      u.name ? `${u.id} — ${u.name}` : String(u.id)])];
    if (shown && shown.upstream && !options.some(([v]) => v === shown.upstream)) {
      options.push([shown.upstream, `${shown.upstream} (not found)`]);
    }
    setOptions(this.select, options, shown ? shown.upstream : "");
    this.percent.value = shown && shown.upstream ? String(shown.percent) : "";
  }

  read(conf) {
    if (this.fields.hidden) return conf;  // a split the form cannot show: kept as is
    if (!this.select.value) {
      delete conf.traffic_split;
      return conf;
    }
    const p = numberOrText(this.percent.value || "0");
    const split = Object.assign({}, conf.traffic_split || {});
    split.weighted_upstreams = [{upstream_id: this.select.value, weight: p},
      {weight: typeof p === "number" ? 100 - p : p}];
    conf.traffic_split = split;
    return conf;
  }
}
