// The mailgate console's page: plain JavaScript, no library, nothing from the network
// but this server's own API. Every value from the API is put in the page with
// textContent (never as HTML); an HTML mail body goes into a sandboxed iframe (no
// scripts, an opaque origin) under this page's Content-Security-Policy, which lets it
// load nothing from elsewhere.
"use strict";

const api = "/api/v1";
const state = { page: "inbox", selected: null, version: null, query: "", view: "html" };

// Control characters and the characters that reorder text (a right-to-left override in
// a captured user name) are shown as \uNNNN, as the CLI reports show them: they are
// text an attacker chose, and must not rearrange or hide what is around them.
const HIDDEN = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

function visible(value) {
  return String(value).replace(HIDDEN, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

function element(tag, text, attributes) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = visible(text);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell); else td.textContent = cell === null ? "" : visible(cell);
    tr.append(td);
  }
  return tr;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function status(text) {
  document.getElementById("status").textContent = text;
}

async function call(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(api + path, options);
  const data = response.headers.get("Content-Type")?.startsWith("application/json")
    ? await response.json() : await response.text();
  return { status: response.status, data };
}

// --- pages -------------------------------------------------------------------------

function show(page) {
  state.page = page;
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== page;
  for (const tab of document.querySelectorAll(".tab")) {
    if (tab.dataset.page === page) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  refresh();
}

async function refresh() {
  try {
    if (state.page === "inbox") await refreshInbox();
    else if (state.page === "queue") await refreshQueue();
    else await refreshHoneypot();
    status("");
  } catch (error) {
    status("cannot reach the server");
  }
}

// --- inbox -------------------------------------------------------------------------

async function refreshInbox(force) {
  const query = state.query ? "&q=" + encodeURIComponent(state.query) : "";
  const { status: code, data } = await call("GET", "/messages?limit=200" + query);
  document.getElementById("inbox-off").hidden = code !== 404;
  if (code !== 200) return;
  if (!force && data.version === state.version && state.shownQuery === state.query) return;
  state.version = data.version;
  state.shownQuery = state.query;
  document.getElementById("count").textContent = data.total + " messages";
  const body = document.querySelector("#messages tbody");
  body.replaceChildren();
  for (const message of data.messages) {
    const tr = row([message.from_header || message.sender, message.recipients.join(", "),
                    message.subject, when(message.received)]);
    tr.dataset.id = message.id;
    if (message.id === state.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => openMessage(message.id));
    body.append(tr);
  }
}

function setView(view) {
  state.view = view;
  document.getElementById("message-html").hidden = view !== "html";
  document.getElementById("message-text").hidden = view !== "text";
  document.getElementById("message-headers").hidden = view !== "headers";
  document.getElementById("message-raw").hidden = view !== "raw";
}

async function openMessage(id) {
  const { status: code, data } = await call("GET", "/messages/" + encodeURIComponent(id));
  if (code !== 200) return;
  state.selected = id;
  for (const tr of document.querySelectorAll("#messages tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.id === id);
  }
  const message = data.message;
  document.getElementById("message").hidden = false;
  document.getElementById("message-subject").textContent = visible(message.subject || "(no subject)");
  const envelope = document.getElementById("message-envelope");
  envelope.replaceChildren();
  for (const [name, value] of [["From", message.from_header || message.sender],
                               ["To", message.to_header || message.recipients.join(", ")],
                               ["Envelope", message.sender + " \u2192 " + message.recipients.join(", ")],
                               ["Received", when(message.received) + " from " + message.client]]) {
    envelope.append(element("dt", name), element("dd", value));
  }
  // The mail's HTML comes from its own URL, in a frame sandboxed here (no allow-scripts,
  // no allow-same-origin) and by the response's own CSP (sandbox; no image from
  // elsewhere until asked, no script, font or request).
  const frame = document.getElementById("message-html");
  const htmlUrl = api + "/messages/" + encodeURIComponent(id) + "/html";
  frame.src = data.html === null ? "about:blank" : htmlUrl;
  const images = document.getElementById("load-images");
  images.hidden = data.html === null;
  images.onclick = () => { frame.src = htmlUrl + "?images=remote"; images.hidden = true; };
  document.getElementById("message-text").textContent = data.text === null ? "" : data.text;
  const headers = document.querySelector("#message-headers tbody");
  headers.replaceChildren(...data.headers.map(([name, value]) => row([name, value])));
  const raw = await fetch(api + "/messages/" + encodeURIComponent(id) + "/raw");
  document.getElementById("message-raw").textContent = await raw.text();
  const list = document.getElementById("message-attachments");
  list.replaceChildren();
  for (const attachment of data.attachments) {
    const link = element("a", (attachment.filename || "attachment") + " (" + attachment.content_type
                         + ", " + attachment.size + " bytes)",
                         { href: api + "/messages/" + encodeURIComponent(id) + "/attachments/"
                                 + attachment.index, download: "" });
    const item = document.createElement("li");
    item.append(link);
    list.append(item);
  }
  setView(data.html === null && state.view === "html" ? "text" : state.view);
  // Releasing goes through the queue: offered when the server has one.
  if (state.hasQueue === undefined) state.hasQueue = (await call("GET", "/queue/stats")).status === 200;
  document.getElementById("release").hidden = !state.hasQueue;
  document.getElementById("release-status").textContent = "";
}

async function releaseMessage(event) {
  event.preventDefault();
  if (!state.selected) return;
  const input = document.getElementById("release-to");
  const to = input.value.split(/[\s,;]+/).filter(Boolean);
  const shown = document.getElementById("release-status");
  if (!to.length) { shown.textContent = "give an address"; return; }
  const { status: code, data } = await call("POST", "/messages/" + encodeURIComponent(state.selected)
                                            + "/release", { to });
  shown.textContent = visible(code === 202 ? "queued as " + data.queue_id : data.error || "not released");
  if (code === 202) input.value = "";
}

async function deleteMessage() {
  if (!state.selected) return;
  await call("DELETE", "/messages/" + encodeURIComponent(state.selected));
  state.selected = null;
  document.getElementById("message").hidden = true;
  await refreshInbox(true);
}

async function deleteAll() {
  await call("DELETE", "/messages");
  state.selected = null;
  document.getElementById("message").hidden = true;
  await refreshInbox(true);
}

// --- queue -------------------------------------------------------------------------

async function refreshQueue() {
  const { status: code, data } = await call("GET", "/queue?limit=500");
  document.getElementById("queue-off").hidden = code !== 404;
  document.getElementById("queue-table").hidden = code !== 200;
  if (code !== 200) return;
  const body = document.querySelector("#queue-table tbody");
  body.replaceChildren();
  for (const message of data.messages) {
    const recipients = message.recipients;
    const last = recipients.map((r) => r.last_reply ? r.last_reply.code + " " + r.last_reply.text : "")
      .filter(Boolean).join("; ");
    const actions = document.createElement("span");
    for (const action of ["flush", "hold", "release", "delete"]) {
      const button = element("button", action, { type: "button" });
      button.addEventListener("click", async () => {
        const path = "/queue/" + encodeURIComponent(message.info.id);
        await (action === "delete" ? call("DELETE", path) : call("POST", path + "/" + action));
        await refreshQueue();
      });
      actions.append(button);
    }
    body.append(row([message.info.id, message.info.sender || "<>",
                     recipients.map((r) => r.address).join(", "),
                     recipients.map((r) => r.state).join(", "), last, actions]));
  }
}

// --- honeypot ----------------------------------------------------------------------

async function refreshHoneypot() {
  const summary = await call("GET", "/honeypot/summary?top=5");
  document.getElementById("honeypot-off").hidden = summary.status !== 404;
  if (summary.status !== 200) return;
  const figures = document.getElementById("honeypot-figures");
  figures.replaceChildren();
  for (const [name, key] of [["Sessions", "sessions"], ["Addresses", "unique_ips"],
                             ["AUTH attempts", "auth_attempts"], ["Messages", "messages"]]) {
    figures.append(element("dt", name), element("dd", summary.data[key]));
  }
  const tops = document.getElementById("honeypot-tops");
  tops.replaceChildren();
  for (const [name, key] of [["Top addresses", "ips"], ["User names", "usernames"],
                             ["Passwords", "passwords"], ["Commands", "commands"]]) {
    const section = document.createElement("section");
    const list = document.createElement("ol");
    for (const item of summary.data.top[key]) list.append(element("li", item.value + " (" + item.count + ")"));
    section.append(element("h3", name), list);
    tops.append(section);
  }
  await drawTimeline();
  const messages = await call("GET", "/honeypot/messages?limit=200");
  const messageRows = document.querySelector("#honeypot-messages tbody");
  messageRows.replaceChildren();
  for (const message of messages.data.messages || []) {
    const source = message.kept
      ? element("a", "download", { href: api + "/honeypot/messages/" + encodeURIComponent(message.id)
                                   + "/raw", download: "" })
      : "";
    messageRows.append(row([message.time, message.peer_ip, message.mail_from || "<>",
                            message.rcpt_tos.join(", "), message.subject, message.urls, source]));
  }
  const sessions = await call("GET", "/honeypot/sessions?limit=200");
  const body = document.querySelector("#honeypot-sessions tbody");
  body.replaceChildren();
  for (const session of sessions.data.sessions) {
    const tr = row([session.started, session.peer_ip, session.helo, session.auth_attempts,
                    session.messages, session.close_reason]);
    tr.addEventListener("click", () => openSession(session.id));
    body.append(tr);
  }
}

// Sessions per hour as bars in an SVG drawn here (no chart library): one bar per hour
// of the last day, scaled to the busiest hour, each with its count as a tooltip.
async function drawTimeline() {
  const { status: code, data } = await call("GET", "/honeypot/timeline?bucket=3600");
  const svg = document.getElementById("honeypot-timeline");
  svg.replaceChildren();
  if (code !== 200) return;
  const points = data.points;
  const most = Math.max(1, ...points.map((p) => p.sessions));
  const total = points.reduce((sum, p) => sum + p.sessions, 0);
  document.querySelector("#honeypot-chart figcaption").textContent =
    "Sessions per hour, last 24 hours: " + total + " in all, busiest hour " + Math.max(0, ...points.map((p) => p.sessions))
    + " (from " + new Date(points[0].start).toLocaleString() + " to now)";
  const width = 480 / points.length;
  const ns = "http://www.w3.org/2000/svg";
  points.forEach((point, index) => {
    const height = (point.sessions / most) * 110;
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", String(index * width + 1));
    bar.setAttribute("y", String(120 - height));
    bar.setAttribute("width", String(Math.max(1, width - 2)));
    bar.setAttribute("height", String(height));
    bar.setAttribute("data-sessions", String(point.sessions));
    const title = document.createElementNS(ns, "title");
    title.textContent = new Date(point.start).toLocaleString() + ": " + point.sessions + " sessions, "
      + point.unique_ips + " addresses, " + point.auth_attempts + " AUTH attempts, "
      + point.messages + " messages";
    bar.append(title);
    svg.append(bar);
  });
}

async function openSession(id) {
  const { status: code, data } = await call("GET", "/honeypot/sessions/" + encodeURIComponent(id));
  if (code !== 200) return;
  const transcript = document.getElementById("honeypot-transcript");
  transcript.hidden = false;
  transcript.textContent = data.events.map((event) =>
    (event.direction === "c" ? "C: " : "S: ") + visible(event.line)).join("\n");
}

// --- start -------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => show(tab.dataset.page));
  }
  for (const button of document.querySelectorAll(".view")) {
    button.addEventListener("click", () => setView(button.dataset.view));
  }
  document.getElementById("delete-message").addEventListener("click", deleteMessage);
  document.getElementById("delete-all").addEventListener("click", deleteAll);
  document.getElementById("release").addEventListener("submit", releaseMessage);
  document.getElementById("queue-flush").addEventListener("click", async () => {
    await call("POST", "/queue/flush");
    await refreshQueue();
  });
  const search = document.getElementById("search");
  search.addEventListener("input", () => { state.query = search.value.trim(); refreshInbox(true); });
  setView("html");
  show(location.hash.slice(1) || "inbox");
  // New mail appears without a reload: the server says when the captured mail or the
  // queue changed (Server-Sent Events; the browser reconnects by itself).
  const events = new EventSource(api + "/events");
  events.addEventListener("messages", () => {
    if (state.page === "inbox") refreshInbox().catch(() => status("cannot reach the server"));
  });
  events.addEventListener("queue", () => {
    if (state.page === "queue") refreshQueue().catch(() => status("cannot reach the server"));
  });
  events.addEventListener("error", () => status("reconnecting\u2026"));
  events.addEventListener("open", () => status(""));
});
