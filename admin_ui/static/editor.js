// Form + raw-JSON editing of one Admin API object (a stream route or an upstream).
//
// The form edits a copy of the stored object, so fields the form does not show
// (labels, timeouts, health checks, other plugins ...) survive a save. A failed
// save leaves every field exactly as typed and shows the API's error_msg beside
// the form.

import {api, enc, ApiError} from "./api.js";
import {$, $$, h, clear, deepCopy, setOptions} from "./dom.js";
import {nodeList} from "./format.js";

// APISIX refuses them on PUT/POST ("the property is forbidden:  create_time").
export function stripTimes(obj) {
  if (obj && typeof obj === "object") {
    delete obj.create_time;
    delete obj.update_time;
    if (obj.upstream && typeof obj.upstream === "object") {
      delete obj.upstream.create_time;
      delete obj.upstream.update_time;
    }
  }
  return obj;
}

// "70000" -> 70000; anything else that is not empty goes as typed, for the API to judge.
export function numberOrText(text) {
  const t = text.trim();
  return /^-?\d+$/.test(t) ? Number(t) : t;
}

export function setField(obj, key, text, convert = (t) => t.trim()) {
  if (text.trim() === "") delete obj[key];
  else obj[key] = convert(text);
}

// The upstream part of a form: balancer type, hash key, retries and a table of nodes.
export class UpstreamEditor {
  constructor(mount) {
    this.root = document.getElementById("tpl-upstream-editor").content.firstElementChild.cloneNode(true);
    mount.appendChild(this.root);
    this.type = $("[data-u=type]", this.root);
    this.key = $("[data-u=key]", this.root);
    this.retries = $("[data-u=retries]", this.root);
    this.keyWrap = $("[data-role=key-wrap]", this.root);
    this.tbody = $("table.nodes tbody", this.root);
    this.extras = new Map();
    this.type.addEventListener("change", () => this.sync());
    $("[data-role=add-node]", this.root).addEventListener("click", () => {
      const row = this.addRow({});
      $("[data-n=host]", row).focus();
    });
  }

  sync() {
    this.keyWrap.hidden = this.type.value !== "chash";
  }

  addRow(node) {
    const cell = (name, value, placeholder, label) => h("td", {},
      h("input", {"data-n": name, value: value === undefined ? "" : value, placeholder,
        "aria-label": label, spellcheck: "false",
        inputmode: name === "host" ? undefined : "numeric"}));
    const row = h("tr", {},
      cell("host", node.host, "127.0.0.1", "node host"),
      cell("port", node.port, "1883", "node port"),
      cell("weight", node.weight, "1", "node weight"),
      h("td", {className: "row-actions"}, h("button", {
        type: "button", className: "btn btn-small btn-icon", title: "remove this node",
        "aria-label": "remove node", onclick: () => { row.remove(); this.ensureRow(); },
      }, "×")));
    // The fields the table does not show (priority, metadata) ride along with the row.
    const extra = Object.assign({}, node);
    delete extra.host; delete extra.port; delete extra.weight;
    this.extras.set(row, extra);
    this.tbody.appendChild(row);
    return row;
  }

  ensureRow() {
    if (!this.tbody.rows.length) this.addRow({});
  }

  fill(upstream) {
    const u = upstream || {};
    const type = u.type || "roundrobin";
    if (![...this.type.options].some((o) => o.value === type)) {
      this.type.appendChild(h("option", {value: type}, type));
    }
    this.type.value = type;
    this.key.value = u.key === undefined ? "" : String(u.key);
    this.retries.value = u.retries === undefined ? "" : String(u.retries);
    this.extras = new Map();
    clear(this.tbody);
    for (const node of nodeList(u.nodes)) this.addRow(node);
    this.ensureRow();
    this.sync();
  }

  // The upstream object: ``base`` with the form's fields laid over it.
  read(base) {
    const u = Object.assign({}, base || {});
    u.type = this.type.value;
    if (u.type === "chash") setField(u, "key", this.key.value);
    else delete u.key;
    setField(u, "retries", this.retries.value, numberOrText);
    u.nodes = [];
    for (const row of this.tbody.rows) {
      const get = (name) => $(`[data-n=${name}]`, row).value;
      if (!get("host").trim() && !get("port").trim() && !get("weight").trim()) continue;
      const node = Object.assign({}, this.extras.get(row) || {});
      node.host = get("host").trim();
      setField(node, "port", get("port"), numberOrText);
      node.weight = get("weight").trim() === "" ? 1 : numberOrText(get("weight"));
      u.nodes.push(node);
    }
    return u;
  }
}

// Which form field an Admin API error is about, if it names one.
function fieldOf(message) {
  if (/'vars' expression/.test(message)) return "vars";
  if (/traffic_split/.test(message)) return "traffic_split";
  let m = /property "([\w-]+)"/.exec(message);
  if (m) return m[1];
  m = /^invalid (remote_addr|server_addr)/.exec(message);
  if (m) return m[1];
  if (/stream plugin|plugin \[/.test(message)) return "plugins";
  if (/upstream id/.test(message)) return "upstream_id";
  if (/^missing key|chash|failed to match pattern/.test(message)) return "key";
  return null;
}

// One editor page: loads the object, switches form <-> JSON, saves, deletes.
export class ResourceEditor {
  // spec: {kind, noun, listHash, fill(obj), read(base) -> obj, defaults() -> obj,
  //        load() -> Promise (extra data the form needs), confirm, toast, navigate}
  constructor(section, spec) {
    this.section = section;
    this.spec = spec;
    this.form = $("form", section);
    this.title = $("[data-role=title]", section);
    this.status = $("[data-role=status]", section);
    this.formPane = $("[data-role=form-pane]", section);
    this.jsonPane = $("[data-role=json-pane]", section);
    this.json = $("textarea[name=json]", section);
    this.idInput = $("input[name=id]", this.formPane);
    this.deleteButton = $("[data-action=delete]", section);
    this.body = $("[data-role=form-body]", section);
    this.mode = "form";
    this.form.addEventListener("submit", (ev) => { ev.preventDefault(); this.save(); });
    for (const tab of $$("[data-mode]", section)) {
      tab.addEventListener("click", () => this.switchMode(tab.dataset.mode));
    }
    this.deleteButton.addEventListener("click", () => this.remove());
  }

  // Open an object (or a new one when id is undefined) in form or JSON mode.
  async show(id, mode) {
    await this.open(id);
    if (mode === "json") this.switchMode("json");
  }

  // The form stays disabled until the object is in it, so nothing typed early is overwritten.
  async open(id) {
    const token = this.opening = (this.opening || 0) + 1;
    this.id = id;
    this.body.disabled = true;
    this.form.dataset.state = "loading";
    this.showStatus(null);
    this.setMode("form");
    this.title.textContent = id === null ? `New ${this.spec.noun}` : `${cap(this.spec.noun)} ${id}`;
    this.idInput.readOnly = id !== null;
    this.deleteButton.hidden = id === null;
    try {
      await this.spec.load();
      let obj = this.spec.defaults();
      if (id !== null) {
        const {data} = await api("GET", `/${this.spec.kind}/${enc(id)}`);
        obj = data.value;
      }
      if (token !== this.opening) return;  // the user moved on to another object
      this.base = stripTimes(deepCopy(obj));
      this.spec.fill(this.base);
      this.body.disabled = false;
      this.form.dataset.state = "ready";
    } catch (err) {
      if (token !== this.opening) return;
      this.form.dataset.state = "error";
      this.showStatus("error", `Could not load ${this.spec.noun} ${id === null ? "" : id}`, err.message);
    }
  }

  current() {
    if (this.mode === "json") {
      try {
        const obj = JSON.parse(this.json.value);
        if (!obj || typeof obj !== "object" || Array.isArray(obj)) {
          throw new Error("expected a JSON object { ... }");
        }
        return obj;
      } catch (err) {
        throw new ApiError(0, null, `invalid JSON: ${err.message}`);
      }
    }
    return idFirst(this.spec.read(deepCopy(this.base)));
  }

  switchMode(mode) {
    if (mode === this.mode || this.form.dataset.state !== "ready") return;
    let obj;
    try {
      obj = stripTimes(this.current());
    } catch (err) {
      this.showStatus("error", "Fix the JSON first", err.message);
      return;
    }
    this.showStatus(null);
    if (mode === "json") {
      this.json.value = JSON.stringify(obj, null, 2);
    } else {
      this.base = obj;
      this.spec.fill(obj);
    }
    this.setMode(mode);
  }

  setMode(mode) {
    this.mode = mode;
    this.formPane.hidden = mode !== "form";
    this.jsonPane.hidden = mode !== "json";
    for (const tab of $$("[data-mode]", this.section)) {
      tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
    }
  }

  async save() {
    this.showStatus(null);
    let obj;
    try {
      obj = stripTimes(this.current());
    } catch (err) {
      this.showStatus("error", "Not saved", err.message);
      return;
    }
    const id = obj.id !== undefined && obj.id !== "" ? obj.id : this.id;
    this.body.disabled = true;
    try {
      let resp;
      if (id === null || id === undefined) {
        delete obj.id;  // POST generates the id ("wrong ... id, do not need it" otherwise)
        resp = await api("POST", `/${this.spec.kind}`, obj);
      } else {
        resp = await api("PUT", `/${this.spec.kind}/${enc(String(id))}`, obj);
      }
      const saved = resp.data && resp.data.value ? resp.data.value.id : id;
      this.spec.toast(`${cap(this.spec.noun)} ${saved} ${resp.status === 201 ? "created" : "saved"}.`);
      this.spec.navigate(this.spec.listHash);
    } catch (err) {
      // Nothing is reset: the form (or the JSON) keeps what was typed.
      const where = err.status ? ` (HTTP ${err.status})` : "";
      this.showStatus("error", `Not saved${where}`, err.message);
    } finally {
      this.body.disabled = false;
    }
  }

  async remove() {
    const ok = await this.spec.confirm(`Delete ${this.spec.noun} ${this.id}?`,
      this.spec.deleteWarning(this.id), "Delete");
    if (!ok) return;
    try {
      await api("DELETE", `/${this.spec.kind}/${enc(this.id)}`);
      this.spec.toast(`${cap(this.spec.noun)} ${this.id} deleted.`);
      this.spec.navigate(this.spec.listHash);
    } catch (err) {
      this.showStatus("error", "Not deleted", err.message);
    }
  }

  showStatus(kind, title, message) {
    for (const el of $$(".invalid", this.section)) el.classList.remove("invalid");
    clear(this.status);
    this.status.hidden = !kind;
    if (!kind) return;
    this.status.className = `alert alert-${kind}`;
    this.status.appendChild(h("strong", {}, title));
    if (message) this.status.appendChild(h("p", {className: "alert-msg", "data-role": "error-msg"}, message));
    const field = message && this.mode === "form" ? fieldOf(message) : null;
    const el = field && this.formPane.querySelector(`[data-field="${CSS.escape(field)}"]`);
    if (el) el.classList.add("invalid");
  }
}

// {id, name, desc, ...rest}: the JSON view reads like the Admin API docs.
function idFirst(obj) {
  const out = {};
  for (const key of ["id", "name", "desc"]) if (key in obj) out[key] = obj[key];
  return Object.assign(out, obj);
}

function cap(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

// The <select> of existing upstreams a route can reference by id.
export function fillUpstreamSelect(select, upstreams, current) {
  const options = upstreams.map((u) => [String(u.id), u.name ? `${u.id} — ${u.name}` : String(u.id)]);
  if (current !== undefined && current !== null && !options.some(([v]) => v === String(current))) {
    options.push([String(current), `${current} (not found)`]);
  }
  if (!options.length) options.push(["", "no upstreams yet"]);
  setOptions(select, options, current === undefined || current === null ? undefined : String(current));
}
