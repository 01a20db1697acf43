// The xml_pipeline dashboard. Every value that comes from the organism (names, ids,
// payloads, reasons) is put in the page as text (textContent, text nodes), never as
// markup: nothing here parses HTML from a string, and the Content-Security-Policy allows no
// inline script.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" && digits !== undefined ? value.toFixed(digits) : String(value);
}

function when(seconds) {
  return new Date(seconds * 1000).toISOString().replace("T", " ").replace("Z", "");
}

function setStatus(text, bad) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("bad", Boolean(bad));
}

async function getJson(url, options) {
  const response = await fetch(url, Object.assign({ cache: "no-store" }, options || {}));
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = { error: response.statusText };
  }
  return { ok: response.ok, status: response.status, body };
}

// -- the organism view ------------------------------------------------------------------

const live = new Map(); // listener name -> {texts in the graph, row cells}

function drawGraph(graph, main) {
  const picture = svg("svg", {
    id: "graph", width: graph.width, height: graph.height,
    viewBox: `0 0 ${graph.width} ${graph.height}`, role: "img",
  });
  const defs = svg("defs");
  const marker = svg("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
    markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse",
  });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }));
  defs.append(marker);
  picture.append(defs);
  const at = new Map(graph.nodes.map((n) => [n.id, n]));
  for (const edge of graph.edges) {
    const a = at.get(edge.from);
    const b = at.get(edge.to);
    if (!a || !b) continue;
    let d;
    if (b.x > a.x) {
      const x1 = a.x + a.w, y1 = a.y + a.h / 2, x2 = b.x, y2 = b.y + b.h / 2;
      d = `M ${x1} ${y1} C ${x1 + 40} ${y1}, ${x2 - 40} ${y2}, ${x2} ${y2}`;
    } else {
      // Back or same column: around the bottom.
      const x1 = a.x + a.w / 2, y1 = a.y + a.h, x2 = b.x + b.w / 2, y2 = b.y + b.h;
      d = `M ${x1} ${y1} C ${x1} ${y1 + 60}, ${x2} ${y2 + 60}, ${x2} ${y2}`;
    }
    picture.append(svg("path", {
      d, class: edge.dashed ? "edge dashed" : "edge", "marker-end": "url(#arrow)",
    }));
  }
  for (const node of graph.nodes) {
    const group = svg("g", { class: `node ${node.kind}`, "data-listener": node.name });
    group.append(svg("rect", { x: node.x, y: node.y, width: node.w, height: node.h, rx: 6 }));
    group.append(svg("text", { x: node.x + 10, y: node.y + 20, class: "name" },
      node.name + (node.cpu_bound ? "  (cpu_bound)" : "")));
    if (node.kind === "listener") {
      const lines = [1, 2, 3, 4].map((i) =>
        svg("text", { x: node.x + 10, y: node.y + 20 + i * 17, class: "live" }, ""));
      lines.forEach((line) => group.append(line));
      live.set(node.name, { lines, cells: null });
    }
    const title = svg("title", {}, (node.payloads || []).join("\n"));
    group.append(title);
    picture.append(group);
  }
  main.append(el("section", { class: "card" }, el("h2", {}, "Routing graph"), picture));
}

function listenerTable(graph, main) {
  const head = ["listener", "received", "handled", "failed", "recv/s", "handled/s",
    "failed/s", "in flight", "queued", "p50 ms", "p99 ms"];
  const body = el("tbody");
  for (const node of graph.nodes) {
    if (node.kind !== "listener") continue;
    const cells = head.slice(1).map(() => el("td", { class: "num" }, "–"));
    body.append(el("tr", { "data-listener": node.name },
      el("td", {}, node.name + (node.cpu_bound ? " (cpu_bound)" : "")), ...cells));
    live.get(node.name).cells = cells;
  }
  main.append(el("section", { class: "card" }, el("h2", {}, "Listeners"),
    el("table", { id: "listeners" },
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))), body)));
}

function showLive(view) {
  setStatus(`live · snapshot ${fmt(view.age_s, 1)} s old`, view.age_s > 5);
  const totals = document.getElementById("totals");
  totals.replaceChildren(...[
    ["ingress", view.ingress], ["rejected", view.rejected], ["egress", view.egress],
    ["dead letters", view.dead_letters], ["in pump", view.in_pump],
    ["backend", view.backend_up === null ? "–" : view.backend_up ? "up" : "DOWN"],
  ].map(([k, v]) => el("span", { class: "total", "data-total": k }, `${k} `, el("b", {}, fmt(v)))));
  const pool = document.getElementById("pool");
  pool.textContent = view.pool === null ? "no worker pool (no cpu_bound listener)" :
    `worker pool: ${view.pool.workers} workers · queued ${view.pool.queued} · ` +
    `in flight ${view.pool.in_flight} · tasks ${view.pool.tasks} · crashes ` +
    `${view.pool.crashes} · timeouts ${view.pool.timeouts} · recycles ${view.pool.recycles}`;
  for (const [name, s] of Object.entries(view.listeners)) {
    const target = live.get(name);
    if (!target) continue;
    target.lines[0].textContent =
      `${fmt(s.received_s, 1)} in/s · ${fmt(s.handled_s, 1)} ok/s · ${fmt(s.failed_s, 1)} err/s`;
    target.lines[1].textContent = `total ${s.received} in · ${s.handled} ok · ${s.failed} err`;
    target.lines[2].textContent = `in flight ${s.in_flight} · queued ${s.queued}`;
    target.lines[3].textContent = `p50 ${fmt(s.p50_ms, 2)} ms · p99 ${fmt(s.p99_ms, 2)} ms`;
    if (target.cells) {
      const values = [s.received, s.handled, s.failed, fmt(s.received_s, 1),
        fmt(s.handled_s, 1), fmt(s.failed_s, 1), s.in_flight, s.queued,
        fmt(s.p50_ms, 3), fmt(s.p99_ms, 3)];
      values.forEach((v, i) => { target.cells[i].textContent = String(v); });
    }
  }
}

async function organismPage(main) {
  const { ok, body } = await getJson("/api/graph");
  if (!ok) { setStatus(body.error, true); return; }
  main.append(el("section", { class: "card" }, el("div", { id: "totals" }),
    el("div", { id: "pool", class: "pool" })));
  drawGraph(body, main);
  listenerTable(body, main);
  const events = new EventSource("/api/events");
  events.onmessage = (event) => showLive(JSON.parse(event.data));
  events.addEventListener("age", (event) => {
    const { age_s } = JSON.parse(event.data);
    if (age_s > 5) setStatus(`event loop not answering: snapshot ${fmt(age_s, 0)} s old`, true);
  });
  events.onerror = () => setStatus("reconnecting…", true);
}

// -- conversations ------------------------------------------------------------------------

function conversationRows(list, open) {
  const body = el("tbody");
  for (const c of list) {
    body.append(el("tr", {},
      el("td", {}, el("button", { class: "link", "data-conversation": c.conversation,
        onclick: () => open(c.conversation) }, c.conversation)),
      el("td", {}, c.origin), el("td", {}, c.to === null ? "(all accepting)" : c.to),
      el("td", {}, c.payload), el("td", {}, c.message), el("td", {}, when(c.time)),
      el("td", { class: "num" }, fmt(c.duration_s * 1000, 2)),
      el("td", {}, c.answered ? "answered" : "open")));
  }
  return el("table", {}, el("thead", {}, el("tr", {}, ...["conversation", "from", "to",
    "payload", "message id", "started", "ms", ""].map((h) => el("th", {}, h)))), body);
}

function frameNode(frame, origin) {
  const name = frame.listener === null ? `${origin} (outside)` : frame.listener;
  const rows = el("tbody");
  for (const s of frame.slots) {
    rows.append(el("tr", { class: `slot ${s.direction}` },
      el("td", { class: "num" }, s.index), el("td", {}, s.direction),
      el("td", {}, s.from), el("td", {}, s.to === null ? "(all accepting)" : s.to),
      el("td", {}, s.payload), el("td", {}, s.message), el("td", {}, when(s.time))));
    rows.append(el("tr", { class: "payload-row" },
      el("td", { colspan: "7" }, el("pre", { class: "payload" }, s.xml))));
  }
  const item = el("li", { class: "frame", "data-thread": frame.thread || "" },
    el("div", { class: "frame-head" }, el("strong", {}, name), " ",
      el("code", {}, frame.thread === null ? "(no longer in the registry)" : frame.thread)),
    frame.slots.length ? el("table", { class: "slots" }, el("thead", {}, el("tr", {},
      ...["#", "dir", "from", "to", "payload", "message id", "time"].map((h) =>
        el("th", {}, h)))), rows) : el("p", {}, "(no history kept)"));
  if (frame.children.length) {
    item.append(el("ul", { class: "tree" }, ...frame.children.map((c) => frameNode(c, origin))));
  }
  return item;
}

async function conversationsPage(main) {
  const detail = el("section", { class: "card", id: "conversation" });
  const open = async (id) => {
    detail.replaceChildren(el("p", {}, "loading…"));
    const { ok, body } = await getJson(`/api/conversation?id=${encodeURIComponent(id)}`);
    if (!ok) { detail.replaceChildren(el("p", { class: "bad", id: "search-error" }, body.error)); return; }
    history.replaceState(null, "", `/conversations?id=${encodeURIComponent(id)}`);
    detail.replaceChildren(el("h2", {}, "Conversation ", el("code", {}, body.conversation),
      " from ", body.origin), el("ul", { class: "tree root" }, frameNode(body.frame, body.origin)));
  };
  const input = el("input", { id: "search", type: "search", size: "48",
    placeholder: "thread id, or the id of the message that started it (its <re>)" });
  const form = el("form", { id: "search-form", onsubmit: (event) => {
    event.preventDefault();
    if (input.value.trim()) open(input.value.trim());
  } }, input, " ", el("button", { type: "submit" }, "Open"));
  const lists = el("div", { id: "lists" }, "loading…");
  main.append(el("section", { class: "card" }, el("h2", {}, "Find a conversation"), form),
    detail, el("section", { class: "card" }, lists));
  const wanted = new URLSearchParams(location.search).get("id");
  if (wanted) { input.value = wanted; open(wanted); }
  const { ok, body } = await getJson("/api/conversations");
  if (!ok) { lists.replaceChildren(el("p", { class: "bad" }, body.error)); setStatus(body.error, true); return; }
  setStatus(`${body.total} conversation(s) in the last ${body.scanned} the registry lists`);
  lists.replaceChildren(el("h2", {}, "Most recent"), conversationRows(body.recent, open),
    el("h2", {}, "Slowest"), conversationRows(body.slowest, open));
}

// -- dead letters ---------------------------------------------------------------------------

async function deadLettersPage(main) {
  const code = el("select", { id: "filter-code" }, el("option", { value: "" }, "any code"));
  const listener = el("select", { id: "filter-listener" },
    el("option", { value: "" }, "any listener"));
  const token = el("input", { id: "token", type: "password", autocomplete: "off",
    placeholder: "token (for replay and purge)" });
  const result = el("p", { id: "action-result", class: "result" });
  const list = el("div", { id: "letters" });
  const load = async () => {
    const query = new URLSearchParams({ code: code.value, listener: listener.value });
    const { ok, body } = await getJson(`/api/deadletters?${query}`);
    if (!ok) { setStatus(body.error, true); return; }
    setStatus(`${body.matching} of ${body.total} dead letter(s)` +
      (body.actions ? "" : " · read-only (started without --web-token)"));
    for (const [select, values] of [[code, body.codes], [listener, body.listeners]]) {
      const chosen = select.value;
      select.replaceChildren(select.options[0],
        ...values.map((v) => el("option", { value: v }, v)));
      select.value = chosen;
    }
    const rows = el("tbody");
    for (const letter of body.letters) {
      const act = (what) => async () => {
        const response = await getJson(`/api/deadletters/${what}`, {
          method: "POST",
          headers: { "Content-Type": "application/json", "X-Dashboard-Token": token.value },
          body: JSON.stringify({ id: letter.id }),
        });
        result.classList.toggle("bad", !response.ok);
        result.textContent = response.ok
          ? `${what} ${letter.id}: ${response.body.result || response.body.status || (response.body.purged ? "purged" : "gone")}`
          : `${what} refused: ${response.body.error}`;
        if (response.ok) load();
      };
      rows.append(el("tr", { "data-letter": letter.id },
        el("td", {}, when(letter.time)), el("td", {}, letter.code),
        el("td", {}, letter.listener || "–"), el("td", {}, letter.stage || "–"),
        el("td", {}, letter.reason, letter.last_error ? el("div", { class: "muted" },
          `last: ${letter.last_error}`) : null),
        el("td", { class: "num" }, letter.attempts),
        el("td", {}, el("pre", { class: "payload" }, letter.data),
          letter.data_capped ? el("div", { class: "muted" },
            `(first 4096 of ${letter.data_bytes} bytes)`) : null),
        el("td", {}, el("button", { class: "replay", onclick: act("replay") }, "Replay"), " ",
          el("button", { class: "purge", onclick: act("purge") }, "Purge"))));
    }
    list.replaceChildren(body.letters.length ? el("table", {}, el("thead", {}, el("tr", {},
      ...["time", "code", "listener", "stage", "reason", "attempts", "original bytes", ""]
        .map((h) => el("th", {}, h)))), rows) : el("p", {}, "no dead letters"));
  };
  code.addEventListener("change", load);
  listener.addEventListener("change", load);
  main.append(el("section", { class: "card" }, el("h2", {}, "Dead letters"),
    el("div", { class: "filters" }, code, " ", listener, " ", token, " ",
      el("button", { id: "reload", onclick: load }, "Reload")), result, list));
  await load();
}

// -- nodes ------------------------------------------------------------------------------------

function age(ms) {
  if (ms === null || ms === undefined) return "–";
  const seconds = ms / 1000;
  return seconds < 120 ? `${seconds.toFixed(1)} s` : `${(seconds / 60).toFixed(0)} min`;
}

function pairs(mapping, join) {
  const entries = Object.entries(mapping || {});
  return entries.length ? entries.map(([k, v]) => `${k}:${join(v)}`).join(" ") : "–";
}

function table(id, head, rows) {
  return el("table", { id }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

function showNodes(view, self, parts) {
  const t = view.transport;
  if (t === null) return;
  setStatus(`live · snapshot ${fmt(view.age_s, 1)} s old`, view.age_s > 5 || t.up === false);
  const names = Object.keys(t.nodes);
  parts.summary.replaceChildren(...[
    ["transport", t.up === null ? "–" : t.up ? "up" : "DOWN"], ["nodes alive", names.length],
    ["reclaimed entries", t.reclaimed], ["this node", self],
  ].map(([k, v]) => el("span", { class: "total", "data-total": k }, `${k} `, el("b", {}, fmt(v)))));
  const now = Date.now() / 1000;
  // Shards as the leases say now (a heartbeat's list is up to 2 s old).
  const leased = {};
  for (const [listener, s] of Object.entries(t.inboxes)) {
    for (const [owner, shards] of Object.entries(s.shards_by_node || {})) {
      (leased[owner] = leased[owner] || []).push(`${listener}:${(shards || []).join(",")}`);
    }
  }
  parts.nodes.replaceChildren(names.length ? table("nodes", ["node", "host", "pid", "listeners",
    "shards", "held", "reclaimed", "state", "up", "version"], names.map((name) => {
    const n = t.nodes[name];
    return el("tr", { "data-node": name }, el("td", {}, name + (name === self ? " (this one)" : "")),
      el("td", {}, fmt(n.host)), el("td", { class: "num" }, fmt(n.pid)),
      el("td", {}, (n.listeners || []).join(", ") || "–"),
      el("td", {}, leased[name] ? leased[name].join(" ") : "none"),
      el("td", { class: "num", "data-held": name }, fmt(n.held)),
      el("td", { class: "num", "data-reclaimed": name },
        fmt(n.taken_over)),
      el("td", {}, n.draining ? "draining" : "serving"),
      el("td", {}, typeof n.started === "number" ? age((now - n.started) * 1000) : "–"),
      el("td", {}, fmt(n.version)));
  })) : el("p", {}, "no node alive"));
  parts.inboxes.replaceChildren(table("inboxes", ["listener", "length", "pending", "lag",
    "oldest pending", "pending by node", "shards by node"], Object.entries(t.inboxes).map(
    ([name, s]) => el("tr", { "data-listener": name }, el("td", {}, name),
      el("td", { class: "num" }, fmt(s.length)), el("td", { class: "num" }, fmt(s.pending)),
      el("td", { class: "num" }, fmt(s.lag)), el("td", {}, age(s.oldest_ms)),
      el("td", {}, pairs(s.pending_by_node, String)),
      el("td", {}, pairs(s.shards_by_node, (v) => (v || []).join(",")))))));
}

async function nodesPage(main, graph) {
  if (!graph.transport) {
    setStatus("one process");
    main.append(el("section", { class: "card", id: "no-transport" }, el("h2", {}, "Nodes"),
      el("p", {}, "This organism runs in one process on in-process inboxes. Start it as ",
        "nodes of a distributed transport (run --transport redis://… --node NAME) to see ",
        "the nodes alive, each listener's stream lag and pending entries, and the entries ",
        "taken over from nodes that stopped.")));
    return;
  }
  const parts = { summary: el("div", { id: "transport" }), nodes: el("div", {}, "waiting…"),
    inboxes: el("div", {}, "waiting…") };
  main.append(el("section", { class: "card" }, parts.summary),
    el("section", { class: "card" }, el("h2", {}, "Nodes alive"), parts.nodes),
    el("section", { class: "card" }, el("h2", {}, "Inbox streams"), parts.inboxes));
  const events = new EventSource("/api/events");
  events.onmessage = (event) => showNodes(JSON.parse(event.data), graph.node, parts);
  events.addEventListener("age", (event) => {
    const { age_s } = JSON.parse(event.data);
    if (age_s > 5) setStatus(`event loop not answering: snapshot ${fmt(age_s, 0)} s old`, true);
  });
  events.onerror = () => setStatus("reconnecting…", true);
}

// -- start ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  const page = document.body.dataset.page;
  document.getElementById(`nav-${page}`).classList.add("here");
  const main = document.getElementById("main");
  const graph = await getJson("/api/graph");
  if (graph.ok) document.getElementById("organism-name").textContent = graph.body.organism;
  if (page === "organism") await organismPage(main);
  else if (page === "conversations") await conversationsPage(main);
  else if (page === "deadletters") await deadLettersPage(main);
  else if (page === "nodes" && graph.ok) await nodesPage(main, graph.body);
  document.body.dataset.ready = "1";
});
