// The dashboard shell: sign-in, the header, hash routing between the pages,
// and the shared toast / error banner / confirmation dialog.

import {probe, session, setBadKeyHandler} from "./api.js";
import {$, $$, h, clear} from "./dom.js";
import {createRoutesList, createRouteEditor} from "./routes.js";
import {createUpstreamsList, createUpstreamEditor} from "./upstreams.js";
import {createConnections} from "./connections.js";
import {createInstances} from "./instances.js";

const VERSION = (document.querySelector("meta[name=gproxy-version]") || {}).content || "";
const banner = $("#banner");
const toastBox = $("#toast");
const dialog = $("#confirm");
let toastTimer = null;

const ctx = {
  toast(message) {
    toastBox.textContent = message;
    toastBox.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toastBox.hidden = true; }, 4000);
  },
  error(message) {
    clear(banner);
    banner.appendChild(h("span", {"data-role": "banner-msg"}, message));
    banner.appendChild(h("button", {type: "button", className: "banner-close", "aria-label": "dismiss",
      onclick: () => ctx.clearError()}, "×"));
    banner.hidden = false;
  },
  clearError() {
    banner.hidden = true;
    clear(banner);
  },
  navigate(hash) {
    if (location.hash === hash) render();
    else location.hash = hash;
  },
  // Resolves true when the user confirms; a <dialog>, not window.confirm().
  confirm(title, message, action = "OK") {
    $("[data-role=title]", dialog).textContent = title;
    $("[data-role=message]", dialog).textContent = message;
    $("[data-role=ok]", dialog).textContent = action;
    return new Promise((resolve) => {
      const done = (ok) => {
        dialog.removeEventListener("close", onClose);
        if (dialog.open) dialog.close();
        resolve(ok);
      };
      const onClose = () => done(false);
      $("[data-role=ok]", dialog).onclick = () => done(true);
      $("[data-role=cancel]", dialog).onclick = () => done(false);
      dialog.addEventListener("close", onClose);
      dialog.showModal();
      $("[data-role=cancel]", dialog).focus();
    });
  },
};

const pages = {
  routes: createRoutesList($("#view-routes"), ctx),
  "route-form": createRouteEditor($("#view-route-form"), ctx),
  upstreams: createUpstreamsList($("#view-upstreams"), ctx),
  "upstream-form": createUpstreamEditor($("#view-upstream-form"), ctx),
  connections: createConnections($("#view-connections"), ctx),
  instances: createInstances($("#view-instances"), ctx),
};

// "#/routes" | "#/routes/new" | "#/routes/<id>" | "#/routes/<id>/json" | ... | "#/signin"
function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const [section, id, mode] = parts;
  if (section === "routes" || section === "upstreams") {
    const view = section === "routes" ? "route-form" : "upstream-form";
    if (id === undefined || id === "") return {view: section};
    return {view, id: id === "new" ? null : id, mode};
  }
  if (section === "connections" || section === "instances" || section === "signin") return {view: section};
  return {view: "routes"};
}

const TABS = {"routes": "routes", "route-form": "routes", "upstreams": "upstreams",
  "upstream-form": "upstreams", "connections": "connections", "instances": "instances"};

function showView(name) {
  for (const el of $$("main > .view")) el.hidden = el.id !== `view-${name}`;
  for (const a of $$(".tabs a")) {
    const on = a.dataset.tab === TABS[name];
    a.classList.toggle("active", on);
    if (on) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  $("#topbar").hidden = name === "signin";
  document.body.classList.toggle("signed-out", name === "signin");
}

async function render() {
  const route = parseHash();
  if (route.view !== "connections") pages.connections.hide();
  if (route.view !== "instances") pages.instances.hide();
  if (!session.signedIn || route.view === "signin") {
    if (session.signedIn) { location.hash = "#/routes"; return; }
    if (location.hash && route.view !== "signin") sessionStorage.setItem("gproxy.wanted", location.hash);
    showView("signin");
    $("#signin-key").focus();
    return;
  }
  ctx.clearError();
  showView(route.view);
  const page = pages[route.view];
  document.title = `${$(`#view-${route.view} h1`).textContent} · gproxy`;
  await page.show(route.id === undefined ? undefined : route.id, route.mode);
  if (route.view.endsWith("-form")) {
    document.title = `${$(`#view-${route.view} [data-role=title]`).textContent} · gproxy`;
  }
}

function showInstance(info) {
  const box = $("#instance");
  clear(box);
  const product = info.server && info.server !== "gproxy" ? info.server : `gproxy${VERSION ? " " + VERSION : ""}`;
  box.appendChild(h("span", {className: "instance-name"}, product));
  box.appendChild(h("span", {className: "instance-host"}, location.host));
  if (info.apiVersion) box.appendChild(h("span", {className: "instance-api"}, `Admin API ${info.apiVersion}`));
}

function signinMessage(kind, title, text) {
  const errorBox = $("#signin-error");
  const note = $("#signin-note");
  errorBox.hidden = note.hidden = true;
  if (!kind) return;
  const box = kind === "error" ? errorBox : note;
  clear(box);
  box.appendChild(h("strong", {}, title));
  if (text) box.appendChild(h("span", {"data-role": "detail"}, ` ${text}`));
  box.hidden = false;
}

async function signIn(key) {
  const button = $("#signin-submit");
  button.disabled = true;
  signinMessage(null);
  try {
    const info = await probe(key);
    session.key = key;
    showInstance(info);
    $("#signin-key").value = "";
    const wanted = sessionStorage.getItem("gproxy.wanted");
    sessionStorage.removeItem("gproxy.wanted");
    ctx.navigate(wanted && !wanted.startsWith("#/signin") ? wanted : "#/routes");
  } catch (err) {
    if (err.status === 401) {
      signinMessage("error", "Wrong admin key.", `The Admin API answered 401: ${err.message}.`);
      $("#signin-key").select();
    } else {
      signinMessage("error", "Cannot sign in.", err.message);
    }
  } finally {
    button.disabled = false;
  }
}

function signOut(note) {
  session.clear();
  pages.connections.hide();
  pages.instances.hide();
  $("#instance").textContent = "";
  for (const form of $$("main form")) form.reset();
  ctx.clearError();
  location.hash = "#/signin";
  signinMessage(note ? "error" : "info", "Signed out.", note || "The admin key was removed from this tab.");
}

setBadKeyHandler((err) => {
  if (session.signedIn) signOut(`The Admin API no longer accepts this key: ${err.message}.`);
});

$("#signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  signIn($("#signin-key").value);
});
$("#signout").addEventListener("click", () => signOut());
$("#signin-where").textContent = `Admin API at ${location.protocol}//${location.host}/apisix/admin`;
window.addEventListener("hashchange", render);

async function start() {
  if (session.signedIn) {
    try {
      showInstance(await probe(session.key));
    } catch (err) {
      if (err.status === 401) {
        session.clear();
        signinMessage("error", "Wrong admin key.", `The key kept in this tab was refused: ${err.message}.`);
      } else {
        ctx.error(err.message);
      }
    }
  }
  render();
}

start();
