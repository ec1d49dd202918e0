// The only way the dashboard talks to gproxy: the Admin API over fetch(),
// with the admin key from this tab's sessionStorage as X-API-KEY.

const KEY = "gproxy.adminKey";
const TIMEOUT_MS = 10000;
export const PREFIX = "/apisix/admin";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { sessionStorage.setItem(KEY, value); },
  get signedIn() { return sessionStorage.getItem(KEY) !== null; },
  clear() { sessionStorage.removeItem(KEY); },
};

// Called when the API says the key itself is wrong or missing (not for a viewer's
// "invalid method for role viewer", which is an error to show, not a reason to sign out).
let onBadKey = () => {};
export function setBadKeyHandler(fn) { onBadKey = fn; }

export class ApiError extends Error {
  constructor(status, body, message) {
    super(message);
    this.status = status;
    this.body = body;
  }
  get badKey() {
    return this.status === 401 && this.body && /apikey/.test(this.body.description || "missing apikey");
  }
}

// "failed to check token (wrong apikey)", the error_msg of an APISIX error body, ...
export function describe(status, body, text) {
  if (body && typeof body === "object") {
    const msg = body.error_msg || body.message;
    if (msg) return body.description ? `${msg} (${body.description})` : String(msg);
  }
  const plain = (text || "").replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
  return plain || `HTTP ${status}`;
}

async function send(method, path, body, key) {
  const headers = {Accept: "application/json"};
  if (key) headers["X-API-KEY"] = key;
  const init = {method, headers, cache: "no-store", credentials: "omit"};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  init.signal = abort.signal;
  try {
    return await fetch(PREFIX + path, init);
  } catch (err) {
    const why = err.name === "AbortError" ? "no answer within 10 s" : err.message;
    throw new ApiError(0, null, `cannot reach the Admin API: ${why}`);
  } finally {
    clearTimeout(timer);
  }
}

async function parse(resp) {
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  return {text, data};
}

// api("GET", "/stream_routes") -> {status, data, headers}; throws ApiError.
export async function api(method, path, body) {
  const resp = await send(method, path, body, session.key);
  const {text, data} = await parse(resp);
  if (!resp.ok) {
    const err = new ApiError(resp.status, data, describe(resp.status, data, text));
    if (err.badKey) onBadKey(err);
    throw err;
  }
  return {status: resp.status, data, headers: resp.headers};
}

// Check a key before keeping it: a read every admin and viewer key may do.
export async function probe(key) {
  const resp = await send("GET", "/stream_routes", undefined, key);
  const {text, data} = await parse(resp);
  if (!resp.ok) throw new ApiError(resp.status, data, describe(resp.status, data, text));
  return {
    server: resp.headers.get("Server") || "",
    apiVersion: resp.headers.get("X-API-VERSION") || "",
  };
}

export const enc = encodeURIComponent;

// The values of an APISIX list answer ({"list": [{key, value, ...}], "total": n}).
export async function listValues(kind) {
  const {data} = await api("GET", `/${kind}`);
  return ((data && data.list) || []).map((item) => item.value).filter(Boolean);
}
