// How numbers, times and addresses read on the page.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "–";
  let i = 0;
  let v = n;
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${v} B` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ${UNITS[i]}`;
}

export function count(n) {
  return typeof n === "number" ? n.toLocaleString("en-US") : "–";
}

// "just now", "12 s ago", "3 min ago", "2 h 5 min ago", "3 d ago" for a Unix time.
export function ago(unixSeconds, now = Date.now() / 1000) {
  if (typeof unixSeconds !== "number") return "–";
  const s = Math.max(0, Math.floor(now - unixSeconds));
  if (s < 2) return "just now";
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ${m % 60} min ago`;
  return `${Math.floor(hours / 24)} d ago`;
}

export function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${hh} h`;
  if (hh) return `${hh} h ${mm} min`;
  if (mm) return `${mm} min ${s % 60} s`;
  return `${s} s`;
}

export function dateTime(unixSeconds) {
  if (typeof unixSeconds !== "number") return "";
  const d = new Date(unixSeconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// MQTT's protocol level as the version people know (MQTT 3.1 is level 3, ...).
const LEVELS = {3: "3.1", 4: "3.1.1", 5: "5.0"};
export function mqttVersion(level) {
  if (level === null || level === undefined) return "–";
  return LEVELS[level] || `level ${level}`;
}

export function hostPort(host, port) {
  const h = String(host);
  return h.includes(":") && !h.startsWith("[") ? `[${h}]:${port}` : `${h}:${port}`;
}

// An upstream's nodes as [{host, port, weight, ...}], whichever form they are stored in.
export function nodeList(nodes) {
  if (Array.isArray(nodes)) return nodes.filter((n) => n && typeof n === "object");
  if (nodes && typeof nodes === "object") {
    return Object.entries(nodes).map(([addr, weight]) => {
      const at = addr.lastIndexOf(":");
      const port = Number(addr.slice(at + 1));
      return {host: addr.slice(0, at), port: isNaN(port) ? addr.slice(at + 1) : port, weight};
    });
  }
  return [];
}

export function nodeAddr(node) {
  return node.port === undefined || node.port === null ? String(node.host) : hostPort(node.host, node.port);
}

// Natural order for ids and addresses ("route-2" before "route-10").
export function naturalCompare(a, b) {
  return String(a).localeCompare(String(b), "en", {numeric: true});
}
