// dmq-gateway console: reads this gateway's JSON API and /metrics once a second and
// streams one peer over the subscribe WebSocket. Plain standard JavaScript (fetch,
// WebSocket, SVG): no library, no build step, nothing fetched from another origin.
"use strict";

(function () {
  const POLL_MS = 1000;
  // Samples kept per rate series: five minutes at one a second.
  const HISTORY = 300;
  const TAIL_MAX = 200;
  const EVENTS_MAX = 30;
  // How long a removed node stays on the page, struck through.
  const GONE_MS = 15000;
  // How long a row stays highlighted after its status changed.
  const FLASH_MS = 4000;
  const TOKEN_KEY = "dmq-console-token";

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ DOM helper
  // h("td", {class: "num"}, "text", child): children are text (escaped) or nodes.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    return el;
  }

  // Puts `rows` in `tbody`, keeping each row already there with the same key (and each
  // of its cells that did not change): a button is never replaced under the pointer
  // between a poll and the next, and a focused one keeps the focus.
  function patchRows(tbody, rows, keyAttr) {
    const old = new Map();
    for (const tr of tbody.children) {
      const key = tr.getAttribute(keyAttr);
      if (key !== null) old.set(key, tr);
    }
    const result = rows.map((tr) => {
      const key = tr.getAttribute(keyAttr);
      const prev = key === null ? null : old.get(key);
      if (!prev || prev.children.length !== tr.children.length) return tr;
      for (const name of prev.getAttributeNames()) if (!tr.hasAttribute(name)) prev.removeAttribute(name);
      for (const name of tr.getAttributeNames()) {
        if (prev.getAttribute(name) !== tr.getAttribute(name)) prev.setAttribute(name, tr.getAttribute(name));
      }
      [...tr.children].forEach((cell, i) => {
        const was = prev.children[i];
        if (was.outerHTML !== cell.outerHTML) was.replaceWith(cell);
      });
      return prev;
    });
    const current = [...tbody.children];
    if (result.length !== current.length || result.some((tr, i) => current[i] !== tr)) {
      tbody.replaceChildren(...result);
    }
  }

  // ------------------------------------------------------------------ formatting
  function fmtRate(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    if (value === 0) return "0";
    if (value < 10) return value.toFixed(1);
    return Math.round(value).toLocaleString("en");
  }
  function fmtInt(value) {
    return value === null || value === undefined ? "–" : Math.round(value).toLocaleString("en");
  }
  function fmtDuration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    const d = Math.floor(seconds / 86400);
    const hh = Math.floor((seconds % 86400) / 3600);
    const mm = Math.floor((seconds % 3600) / 60);
    const ss = seconds % 60;
    if (d) return `${d} d ${hh} h`;
    if (hh) return `${hh} h ${mm} min`;
    if (mm) return `${mm} min ${ss} s`;
    return `${ss} s`;
  }
  function fmtAgo(unix) {
    if (unix === null || unix === undefined) return "never";
    const ago = Date.now() / 1000 - unix;
    if (ago < 1.5) return "just now";
    return fmtDuration(ago) + " ago";
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function clock(date) {
    return (date || new Date()).toLocaleTimeString("en-GB", { hour12: false });
  }

  // ------------------------------------------------------------------ token and API
  let token = sessionStorage.getItem(TOKEN_KEY) || "";

  class AuthError extends Error {}
  class ApiError extends Error {
    constructor(status, detail, problem) {
      super(detail);
      this.status = status;
      this.problem = problem;
    }
  }

  // What a problem+json answer says, with the fields a 422 names.
  function problemText(status, problem, fallback) {
    if (problem && typeof problem === "object") {
      let text = problem.detail || problem.title || fallback;
      if (Array.isArray(problem.errors) && problem.errors.length) {
        const fields = problem.errors.map((e) => {
          const loc = Array.isArray(e.loc) ? e.loc.filter((p) => p !== "body").join(".") : "";
          return loc ? `${loc}: ${e.msg}` : e.msg;
        });
        text = fields.join("; ");
      }
      return `${status}: ${text}`;
    }
    return `${status}: ${fallback}`;
  }

  // API paths are resolved against the page's own URL, so a console served by a
  // reverse proxy under a sub-path (https://host/dmq/) reaches the API under it too.
  function relative(path) { return path.replace(/^\//, ""); }

  async function api(method, path, options) {
    options = options || {};
    const headers = Object.assign({}, options.headers || {});
    if (token) headers.Authorization = "Bearer " + token;
    let body = options.body;
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(options.json);
    }
    const response = await fetch(relative(path), { method, headers, body, cache: "no-store" });
    const type = response.headers.get("content-type") || "";
    let data = null;
    if (response.status !== 204) {
      data = type.includes("json") ? await response.json().catch(() => null) : await response.text();
    }
    if (response.status === 401) {
      throw new AuthError((data && data.detail) || "the gateway needs an API token");
    }
    if (!response.ok) {
      throw new ApiError(response.status, problemText(response.status, data, response.statusText), data);
    }
    return { status: response.status, data };
  }

  // ------------------------------------------------------------------ /metrics
  // The Prometheus text format: `name{label="value",...} number` per line.
  const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  function parseMetrics(text) {
    const samples = new Map();
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = SAMPLE.exec(line);
      if (!m) continue;
      const labels = {};
      if (m[2]) {
        for (const l of m[2].matchAll(LABEL)) {
          labels[l[1]] = l[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
        }
      }
      if (!samples.has(m[1])) samples.set(m[1], []);
      samples.get(m[1]).push({ labels, value: Number(m[3]) });
    }
    return {
      // The sum of a metric's samples whose labels match `where` (all of them if none).
      sum(name, where) {
        let total = 0;
        for (const s of samples.get(name) || []) {
          if (where && Object.entries(where).some(([k, v]) => s.labels[k] !== v)) continue;
          total += s.value;
        }
        return total;
      },
      // name -> {label value -> sum} grouped by one label.
      by(name, label) {
        const out = {};
        for (const s of samples.get(name) || []) {
          const key = s.labels[label];
          out[key] = (out[key] || 0) + s.value;
        }
        return out;
      },
      has(name) { return samples.has(name); },
    };
  }

  // A counter turned into a per-second rate, with the last HISTORY rates kept.
  class Rate {
    constructor() { this.last = null; this.at = 0; this.series = []; this.value = null; }
    push(total, now) {
      if (this.last !== null && now > this.at && total >= this.last) {
        this.value = (total - this.last) / ((now - this.at) / 1000);
      } else if (this.last !== null) {
        this.value = 0; // a reset (the gateway restarted)
      }
      this.last = total;
      this.at = now;
      if (this.value !== null) {
        this.series.push(this.value);
        if (this.series.length > HISTORY) this.series.shift();
      }
    }
  }
  const rates = new Map();
  function rate(key) {
    if (!rates.has(key)) rates.set(key, new Rate());
    return rates.get(key);
  }

  // Two series as one small SVG chart: in (blue) and out (orange).
  function sparkline(seriesIn, seriesOut, label, width, height) {
    width = width || 150;
    height = height || 30;
    const top = Math.max(1, ...seriesIn, ...(seriesOut || []));
    const chart = svg("svg", {
      width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label,
    });
    const title = svg("title");
    title.textContent = `${label} (peak ${fmtRate(top)}/s)`;
    chart.append(title);
    chart.append(svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, stroke: "#d5dae1" }));
    // The time axis spans the last minute at first, then grows to HISTORY seconds.
    const span = Math.min(HISTORY, Math.max(60, seriesIn.length, (seriesOut || []).length));
    for (const [series, colour] of [[seriesIn, "var(--in)"], [seriesOut, "var(--out)"]]) {
      if (!series || series.length < 2) continue;
      const step = width / (span - 1);
      const start = width - step * (series.length - 1);
      const points = series.map((v, i) =>
        `${(start + i * step).toFixed(1)},${(height - 1 - (v / top) * (height - 3)).toFixed(1)}`);
      chart.append(svg("polyline", {
        points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 1.5,
        "stroke-linejoin": "round",
      }));
    }
    return chart;
  }

  // ------------------------------------------------------------------ state
  let polling = false;
  let pollTimer = null;
  let nodes = [];
  let peers = [];
  let localUri = "";
  const knownNodes = new Map(); // uri -> {status, gone: time|null}
  let firstNodes = true;
  const events = [];

  function setLive(state, text) {
    $("live-dot").className = "dot " + state;
    $("live-text").textContent = text;
  }
  function banner(text) {
    const el = $("banner");
    el.textContent = text || "";
    el.hidden = !text;
  }

  // ------------------------------------------------------------------ token prompt
  function askToken(message) {
    stopPolling();
    tail.stop("the API token was refused");
    $("auth-message").textContent = message || "";
    $("auth").hidden = false;
    setLive("off", "needs a token");
    const input = $("auth-token");
    input.value = "";
    input.focus();
  }

  $("auth-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const candidate = $("auth-token").value.trim();
    if (!candidate) return;
    const previous = token;
    token = candidate;
    try {
      await api("GET", "/v1/nodes");
    } catch (err) {
      token = previous;
      if (err instanceof AuthError) {
        $("auth-message").textContent =
          `The gateway refused this token (${err.message}). Check it and try again.`;
        $("auth-token").select();
        return;
      }
      $("auth-message").textContent = `The gateway could not be reached: ${err.message}`;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("auth").hidden = true;
    $("forget-token").hidden = false;
    startPolling();
  });

  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = "";
    $("forget-token").hidden = true;
    askToken("The token was forgotten: enter one to go on.");
  });

  // ------------------------------------------------------------------ polling
  function startPolling() {
    if (polling) return;
    polling = true;
    buildKamailio();
    poll();
  }
  function stopPolling() {
    polling = false;
    clearTimeout(pollTimer);
  }

  async function poll() {
    if (!polling) return;
    const started = Date.now();
    try {
      const [health, nodeList, peerList, metricsText] = await Promise.all([
        api("GET", "/v1/health"),
        api("GET", "/v1/nodes"),
        api("GET", "/v1/peers"),
        api("GET", "/metrics"),
      ]);
      const metrics = parseMetrics(metricsText.data || "");
      const now = Date.now();
      renderHealth(health.data, metrics, now);
      renderNodes(nodeList.data, now);
      renderPeers(peerList.data, metrics, now);
      refreshKamailio(false);
      banner("");
      setLive("on", "live · " + clock());
    } catch (err) {
      if (err instanceof AuthError) {
        askToken(token
          ? `The gateway refused the token: ${err.message}. Enter a valid one.`
          : "This gateway needs an API token.");
        return;
      }
      setLive("off", "not answering");
      banner(`The gateway is not answering (${err.message}); retrying every second. ` +
        "What is shown is as it was last read.");
    }
    if (polling) pollTimer = setTimeout(poll, Math.max(100, POLL_MS - (Date.now() - started)));
  }

  // ------------------------------------------------------------------ health
  function card(label, value, note, opts) {
    opts = opts || {};
    return h("div", { class: "card" + (opts.alert ? " alert" : ""), "data-metric": opts.key },
      h("div", { class: "label" }, label),
      h("div", { class: "value" }, value),
      opts.chart || null,
      h("div", { class: "note" }, note));
  }

  function renderHealth(health, m, now) {
    localUri = health.node;
    $("node-uri").textContent = health.node;
    const status = $("node-status");
    status.textContent = health.status;
    status.className = "badge " + health.status;
    $("footer-version").textContent = "dmq-gateway " + health.version;
    document.title = `${health.node} · dmq-gateway console`;

    const kIn = rate("kdmq-in"), kOut = rate("kdmq-out");
    kIn.push(m.sum("dmq_kdmq_received_total"), now);
    kOut.push(m.sum("dmq_kdmq_sent_total"), now);
    const retrans = m.sum("dmq_retransmissions_sent_total");
    const timeouts = m.sum("dmq_transaction_timeouts_total");
    const replyTimeouts = m.sum("dmq_peer_reply_timeouts_total");
    const clients = m.sum("dmq_websocket_clients");
    const cutoffs = m.sum("dmq_websocket_queue_overflows_total");
    const outbox = m.sum("dmq_outbox_messages");
    const outboxBytes = m.sum("dmq_outbox_bytes");
    const dropped = m.sum("dmq_outbox_dropped_total");
    const statuses = m.by("dmq_nodes", "status");
    const others = (statuses.active || 0) + (statuses.not_active || 0) + (statuses.disabled || 0);
    const refused = m.sum("dmq_http_refused_total") + m.sum("dmq_tcp_refused_total");
    const rss = m.has("process_resident_memory_bytes") ? m.sum("process_resident_memory_bytes") : null;

    $("health-cards").replaceChildren(
      card("Uptime", fmtDuration(health.uptime), "since this gateway started", { key: "uptime" }),
      card("Other nodes active", `${health.active_nodes} of ${others}`,
        (statuses.disabled ? `${statuses.disabled} disabled` : "none disabled") +
        (statuses.not_active ? `, ${statuses.not_active} not active` : ""),
        { key: "active-nodes", alert: health.active_nodes < others }),
      card("KDMQ in /s", fmtRate(kIn.value), "requests received from other nodes",
        { key: "kdmq-in", chart: sparkline(kIn.series, null, "KDMQ in per second, last minutes", 160, 26) }),
      card("KDMQ out /s", fmtRate(kOut.value), "requests sent to other nodes",
        { key: "kdmq-out", chart: sparkline([], kOut.series, "KDMQ out per second, last minutes", 160, 26) }),
      card("Retransmissions", fmtInt(retrans), "UDP requests sent again (no answer yet)",
        { key: "retransmissions" }),
      card("Timeouts", fmtInt(timeouts), "requests no node answered in time (Timer F)",
        { key: "timeouts", alert: timeouts > 0 }),
      card("Reply timeouts", fmtInt(replyTimeouts), "messages no subscriber answered in time",
        { key: "reply-timeouts" }),
      card("WebSocket clients", fmtInt(clients), "subscribers connected now", { key: "ws-clients" }),
      card("Slow-consumer cut-offs", fmtInt(cutoffs), "subscribers closed for reading too slowly",
        { key: "cutoffs", alert: cutoffs > 0 }),
      card("Waiting in outboxes", fmtInt(outbox), `${fmtBytes(outboxBytes)}, resent when a node is back` +
        (dropped ? `; ${fmtInt(dropped)} dropped` : ""), { key: "outbox", alert: dropped > 0 }),
      card("Refused connections", fmtInt(refused), "HTTP and SIP TCP refused by a bound or the token",
        { key: "refused" }),
      rss === null ? null : card("Memory", fmtBytes(rss), "resident size of the process", { key: "memory" }),
    );
  }

  // ------------------------------------------------------------------ bus
  function addEvent(uri, from, to) {
    events.unshift({ at: new Date(), uri, from, to });
    if (events.length > EVENTS_MAX) events.pop();
    $("node-events").replaceChildren(...events.map((e) =>
      h("li", { "data-node": e.uri, "data-status": e.to },
        h("time", {}, clock(e.at)),
        h("span", { class: "mono" }, e.uri), " ",
        e.from ? h("span", { class: "badge " + e.from }, e.from) : "new",
        " → ", h("span", { class: "badge " + e.to }, e.to))));
  }

  function renderNodes(list, now) {
    nodes = list;
    const seen = new Set();
    const change = (uri, from, to) => {
      addEvent(uri, from, to);
      knownNodes.get(uri).changedAt = now;
    };
    for (const node of list) {
      seen.add(node.uri);
      const known = knownNodes.get(node.uri);
      if (!known || known.gone) {
        knownNodes.set(node.uri, { status: node.status, gone: null, changedAt: 0 });
        if (!firstNodes) change(node.uri, known && known.gone ? "removed" : null, node.status);
      } else if (known.status !== node.status) {
        const from = known.status;
        known.status = node.status;
        change(node.uri, from, node.status);
      }
    }
    for (const [uri, known] of knownNodes) {
      if (seen.has(uri)) continue;
      if (!known.gone) {
        known.gone = now;
        change(uri, known.status, "removed");
      } else if (now - known.gone > GONE_MS) {
        knownNodes.delete(uri);
      }
    }
    firstNodes = false;
    const flashing = (uri) => {
      const known = knownNodes.get(uri);
      return known && now - known.changedAt < FLASH_MS;
    };

    const rows = list.map((node) => h("tr", {
      "data-node": node.uri, "data-status": node.status, class: flashing(node.uri) ? "changed" : null,
    },
      h("td", { class: "mono" }, node.uri, node.local ? h("span", { class: "badge local", title: "the node of this gateway" }, "this node") : null),
      h("td", {}, h("span", { class: "badge " + node.status }, node.status.replace("_", " "))),
      h("td", {}, node.transport.toUpperCase()),
      h("td", { title: node.last_reply ? new Date(node.last_reply * 1000).toISOString() : "" },
        node.local ? "–" : fmtAgo(node.last_reply)),
      h("td", { class: "num" }, node.local ? "–" : String(node.failures)),
      h("td", { class: "row-actions" }, node.local ? null : h("button", {
        type: "button", class: "danger", onclick: () => removeNode(node.uri),
        "aria-label": `remove node ${node.uri}`,
      }, "Remove"))));
    for (const [uri, known] of knownNodes) {
      if (!known.gone) continue;
      rows.push(h("tr", { "data-node": uri, "data-status": "removed", class: "gone" + (flashing(uri) ? " changed" : "") },
        h("td", { class: "mono" }, uri), h("td", {}, h("span", { class: "badge removed" }, "removed")),
        h("td", {}), h("td", {}, "left the list " + fmtAgo(known.gone / 1000)), h("td", {}), h("td", {})));
    }
    if (list.length <= 1 && rows.length <= 1) {
      rows.push(h("tr", { class: "empty" }, h("td", { colspan: 6 }, "No other node yet: this gateway is a bus of one.")));
    }
    patchRows($("nodes-body"), rows, "data-node");

    const target = $("send-target");
    const chosen = target.value;
    target.replaceChildren(h("option", { value: "" }, "every other node (broadcast)"),
      ...list.filter((n) => !n.local).map((n) => h("option", { value: n.uri }, "only " + n.uri)));
    target.value = list.some((n) => n.uri === chosen) ? chosen : "";
  }

  function formResult(id, text, ok) {
    const el = $(id);
    el.textContent = text;
    el.className = "result " + (ok ? "ok" : "bad");
  }

  async function removeNode(uri) {
    if (!confirm(`Remove ${uri} from this gateway's node list?\n\nIt comes back if it speaks to this node again.`)) return;
    try {
      await api("DELETE", "/v1/nodes/" + encodeURIComponent(uri));
      formResult("node-form-result", `Removed ${uri}.`, true);
      poll();
    } catch (err) {
      handleActionError(err, "node-form-result");
    }
  }

  function handleActionError(err, resultId) {
    if (err instanceof AuthError) { askToken("The gateway refused the token: " + err.message); return; }
    formResult(resultId, err.message, false);
  }

  $("node-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const uri = event.target.uri.value.trim();
    try {
      const { data } = await api("POST", "/v1/nodes", { json: { uri } });
      formResult("node-form-result", `Added ${data.uri} (${data.status}).`, true);
      event.target.uri.value = "";
    } catch (err) {
      handleActionError(err, "node-form-result");
    }
  });

  // ------------------------------------------------------------------ peers
  function renderPeers(list, m, now) {
    peers = list;
    const sentBy = m.by("dmq_kdmq_sent_total", "peer");
    const receivedBy = m.by("dmq_kdmq_received_total", "peer");
    const rows = list.map((peer) => {
      const rIn = rate("in:" + peer.peer_id), rOut = rate("out:" + peer.peer_id);
      rIn.push(receivedBy[peer.peer_id] || 0, now);
      rOut.push(sentBy[peer.peer_id] || 0, now);
      return h("tr", { "data-peer": peer.peer_id },
        h("td", {}, h("strong", { class: "mono" }, peer.peer_id),
          peer.persistent ? null : h("span", { class: "badge", title: "registered by --peer at start: not kept across restarts" }, "--peer"),
          peer.description ? h("span", { class: "peer-desc" }, peer.description) : null),
        h("td", { title: peer.reply === "subscriber" ? `reply timeout ${peer.reply_timeout} s` : "" }, peer.reply),
        h("td", { class: "num" }, `${fmtInt(peer.history_size)} / ${fmtInt(peer.history)}`),
        h("td", { class: "mono" }, peer.epoch),
        h("td", { class: "num" }, fmtInt(peer.offset)),
        h("td", { class: "num" }, fmtInt(peer.subscribers)),
        h("td", { class: "num", "data-rate": "in" }, fmtRate(rIn.value)),
        h("td", { class: "num", "data-rate": "out" }, fmtRate(rOut.value)),
        h("td", {}, sparkline(rIn.series, rOut.series, `${peer.peer_id}: messages per second in (blue) and out (orange), last minutes`)),
        h("td", { class: "row-actions" },
          h("button", { type: "button", class: "secondary", onclick: () => tailPeer(peer.peer_id) }, "Tail"), " ",
          h("button", { type: "button", class: "secondary", onclick: () => editPeer(peer.peer_id) }, "Edit"), " ",
          h("button", { type: "button", class: "danger", onclick: () => unregisterPeer(peer.peer_id),
            "aria-label": `unregister peer ${peer.peer_id}` }, "Unregister")));
    });
    if (!rows.length) {
      rows.push(h("tr", { class: "empty" }, h("td", { colspan: 10 },
        "No peer registered: register one below (or start the gateway with --peer NAME).")));
    }
    patchRows($("peers-body"), rows, "data-peer");

    const ids = list.map((p) => p.peer_id);
    $("peer-ids").replaceChildren(...ids.map((id) => h("option", { value: id })));
    const select = $("tail-peer");
    const chosen = select.value;
    const current = [...select.options].map((o) => o.value).join("\n");
    if (current !== ids.join("\n")) {
      select.replaceChildren(...ids.map((id) => h("option", { value: id }, id)));
      if (ids.includes(chosen)) select.value = chosen;
    }
    $("tail-start").disabled = !ids.length && !tail.socket;
  }

  function editPeer(id) {
    const peer = peers.find((p) => p.peer_id === id);
    if (!peer) return;
    const form = $("peer-form");
    for (const name of ["peer_id", "description", "reply", "reply_timeout", "history", "history_max_age"]) {
      form.elements[name].value = peer[name];
    }
    $("peer-editor").open = true;
    form.elements.description.focus();
  }

  async function unregisterPeer(id) {
    if (!confirm(`Unregister peer ${id}?\n\nIts history is deleted, its subscribers are closed, and KDMQ for it gets 404 again.`)) return;
    try {
      await api("DELETE", "/v1/peers/" + encodeURIComponent(id));
      formResult("peer-form-result", `Unregistered ${id}.`, true);
      poll();
    } catch (err) {
      handleActionError(err, "peer-form-result");
    }
  }

  $("peer-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const id = f.peer_id.value.trim();
    const body = {
      description: f.description.value,
      reply: f.reply.value,
      reply_timeout: Number(f.reply_timeout.value),
      history: Number(f.history.value),
      history_max_age: Number(f.history_max_age.value),
    };
    try {
      const { status } = await api("PUT", "/v1/peers/" + encodeURIComponent(id), { json: body });
      formResult("peer-form-result", status === 201 ? `Registered ${id}.` : `Updated ${id}.`, true);
      poll();
    } catch (err) {
      handleActionError(err, "peer-form-result");
    }
  });

  // ------------------------------------------------------------------ traffic: tail
  const CLOSES = {
    1000: "closed",
    1006: "the connection was lost (or refused: a wrong token, or the gateway is down)",
    1008: "refused by the gateway",
    1012: "the gateway is stopping (a restart?)",
    4004: "the peer is not registered (or was unregistered)",
    4008: "this page read too slowly and was cut off",
  };

  const tail = {
    socket: null,
    peer: null,
    epoch: null,
    offset: null,
    paused: false,
    held: [],
    wanted: false,
    retry: null,

    start(peer, replay) {
      if (info(peer) === "subscriber" && !confirm(
        `Peer ${peer} is in reply=subscriber mode: its subscribers answer its messages. ` +
        "The console only watches and never answers: while it is the only subscriber, " +
        "each message gets 408 after the reply timeout instead of 480 at once.\n\nListen anyway?")) {
        return;
      }
      this.stop();
      this.wanted = true;
      this.peer = peer;
      this.epoch = null;
      this.offset = null;
      this.connect(replay);
      $("tail-start").textContent = "Stop";
      $("tail-pause").disabled = false;
    },

    connect(replay) {
      const info = peers.find((p) => p.peer_id === this.peer);
      const query = new URLSearchParams();
      if (this.offset !== null && this.epoch !== null) {
        query.set("since", String(this.offset));
        query.set("epoch", this.epoch);
      } else if (replay && info) {
        query.set("since", String(Math.max(0, info.offset - 20)));
      }
      if (token) query.set("token", token);
      const qs = query.toString();
      const url = new URL(relative(`/v1/peers/${encodeURIComponent(this.peer)}/subscribe${qs ? "?" + qs : ""}`), location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      const socket = new WebSocket(url.href);
      this.socket = socket;
      status(`connecting to peer ${this.peer}…`);
      socket.onmessage = (event) => this.frame(JSON.parse(event.data));
      socket.onclose = (event) => {
        if (this.socket !== socket) return;
        this.socket = null;
        const why = event.reason || CLOSES[event.code] || "closed";
        const resumable = this.wanted && (event.code === 1012 || event.code === 1006 || event.code === 4008);
        if (resumable) {
          status(`disconnected (${event.code}: ${why}); reconnecting in 2 s and resuming after offset ${this.offset ?? "–"}`, true);
          this.retry = setTimeout(() => { if (this.wanted) this.connect(false); }, 2000);
        } else {
          status(`stopped listening to ${this.peer} (${event.code}: ${why})`, event.code !== 1000);
          this.stopped();
        }
      };
    },

    frame(frame) {
      if (frame.type === "subscribed") {
        this.epoch = frame.epoch;
        if (this.offset === null) this.offset = frame.since ?? frame.offset;
        status(`listening to ${frame.peer}: epoch ${frame.epoch}, latest offset ${frame.offset}` +
          (info(frame.peer) === "subscriber" ? ". This peer is in reply=subscriber mode: the console does not answer, another subscriber must." : ""));
        return;
      }
      if (frame.type === "message") {
        this.offset = frame.offset;
        this.epoch = frame.epoch;
      }
      if (this.paused) {
        this.held.push(frame);
        $("tail-pause").textContent = `Resume (${this.held.length} waiting)`;
        return;
      }
      showFrame(frame);
    },

    pause() {
      if (!this.paused) {
        this.paused = true;
        $("tail-pause").textContent = "Resume";
        return;
      }
      this.paused = false;
      $("tail-pause").textContent = "Pause";
      const held = this.held;
      this.held = [];
      for (const frame of held) showFrame(frame);
    },

    stop(reason) {
      this.wanted = false;
      clearTimeout(this.retry);
      if (this.socket) {
        const socket = this.socket;
        this.socket = null;
        socket.close(1000);
        status(reason ? `stopped: ${reason}` : `stopped listening to ${this.peer}`, Boolean(reason));
      }
      this.stopped();
    },

    stopped() {
      this.wanted = false;
      $("tail-start").textContent = "Start";
      $("tail-pause").disabled = true;
      $("tail-pause").textContent = "Pause";
      if (this.paused) this.pause();
    },
  };

  function info(peerId) {
    const p = peers.find((x) => x.peer_id === peerId);
    return p ? p.reply : null;
  }

  function status(text, bad) {
    const el = $("tail-status");
    el.textContent = text;
    el.className = "tail-status" + (bad ? " bad" : "");
  }

  function prettyBody(frame) {
    if (frame.encoding === "base64") return { text: frame.body, note: "binary, base64" };
    const type = (frame.content_type || "").toLowerCase();
    const body = frame.body ?? "";
    if (type.includes("json") || /^\s*[[{]/.test(body)) {
      try { return { text: JSON.stringify(JSON.parse(body), null, 2), note: null }; } catch (e) { /* not JSON */ }
    }
    return { text: body, note: null };
  }

  function showFrame(frame) {
    const list = $("tail-list");
    let item;
    if (frame.type === "message") {
      const body = prettyBody(frame);
      item = h("li", { class: "fresh", "data-offset": frame.offset },
        h("div", { class: "meta" },
          h("span", {}, h("strong", {}, "#" + frame.offset)),
          h("span", {}, clock()),
          h("span", {}, "from ", h("span", { class: "mono" }, frame.from)),
          h("span", {}, frame.content_type || "no content type"),
          body.note ? h("span", {}, body.note) : null),
        h("pre", {}, body.text));
    } else if (frame.type === "gap") {
      item = h("li", { class: "notice" }, `Gap: offsets ${frame.from}–${frame.to} are not held any more` +
        (frame.reason ? ` (${frame.reason})` : "") + ".");
    } else if (frame.type === "error") {
      item = h("li", { class: "notice" }, "Gateway: " + frame.error);
    } else {
      item = h("li", { class: "notice" }, JSON.stringify(frame));
    }
    list.prepend(item);
    while (list.children.length > TAIL_MAX) list.lastElementChild.remove();
  }

  function tailPeer(id) {
    $("tail-peer").value = id;
    tail.start(id, $("tail-replay").checked);
    $("traffic").scrollIntoView({ behavior: "smooth" });
  }

  $("tail-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (tail.socket || tail.wanted) { tail.stop(); return; }
    const peer = $("tail-peer").value;
    if (peer) tail.start(peer, $("tail-replay").checked);
  });
  $("tail-pause").addEventListener("click", () => tail.pause());
  $("tail-clear").addEventListener("click", () => $("tail-list").replaceChildren());

  // ------------------------------------------------------------------ traffic: send
  $("send-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const peer = f.peer.value.trim();
    const target = f.target.value;
    const wait = f.wait.checked;
    const query = new URLSearchParams();
    if (target) query.set("node", target);
    if (wait) query.set("wait", "true");
    const path = `/v1/peers/${encodeURIComponent(peer)}/${target ? "send" : "broadcast"}?${query}`;
    const out = $("send-result");
    out.replaceChildren(h("p", { class: "muted" }, wait ? "sending, waiting for every node…" : "sending…"));
    try {
      const { status: code, data } = await api("POST", path, {
        body: f.body.value, headers: { "Content-Type": f.content_type.value },
      });
      out.replaceChildren(...sendResult(code, data));
    } catch (err) {
      if (err instanceof AuthError) { askToken("The gateway refused the token: " + err.message); return; }
      out.replaceChildren(h("p", { class: "result bad" }, err.message));
    }
  });

  function sendResult(code, data) {
    if (code === 202) {
      return [h("p", { class: "summary" }, `Accepted (message ${data.id}): being sent to ${data.targets} node(s).`),
        data.nodes.length ? h("ul", {}, ...data.nodes.map((n) => h("li", { class: "mono" }, n))) : null];
    }
    const results = data.results || [];
    const ok = results.filter((r) => r.code !== null && r.code >= 200 && r.code < 300).length;
    const queued = results.filter((r) => r.outcome === "queued").length;
    const dropped = results.filter((r) => r.outcome === "dropped").length;
    let summary = results.length
      ? `${ok} of ${results.length} node(s) answered 2xx (message ${data.id})`
      : "No other node on the bus: nothing to send to (a success with zero targets).";
    if (queued) summary += `; ${queued} queued: the node is down, and the message is resent when it answers again`;
    if (dropped) summary += `; ${dropped} dropped`;
    if (results.length) summary += ".";
    return [h("p", { class: "summary" }, summary),
      results.length ? h("table", { class: "grid" },
        h("thead", {}, h("tr", {}, ...["Node", "Outcome", "Code", "Reason", "Reply body"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, ...results.map((r) => h("tr", { "data-node": r.node },
          h("td", { class: "mono" }, r.node),
          h("td", {}, h("span", { class: "badge " + (r.outcome === "delivered" && r.code < 300 ? "active" : r.outcome === "queued" ? "not_active" : "disabled") },
            r.timeout ? "timeout" : (r.outcome || "pending"))),
          h("td", { class: "num" }, r.code ?? "–"),
          h("td", {}, r.reason || ""),
          h("td", {}, r.body ? h("pre", {}, r.body) : ""))))) : null];
  }

  // ------------------------------------------------------------------ kamailio
  // The typed mirrors of Kamailio's htable, usrloc and dialog peers (/v1/htable,
  // /v1/registrations, /v1/dialogs), read every KAM_EVERY polls. A gateway without
  // them (404 from the router, or a mirror that is not running) says so per part.
  const KAM_EVERY = 5;
  const kam = { round: 0, table: null, prefix: "", pages: [null], page: 0, aor: "" };

  function kamNotAvailable(err) {
    if (!(err instanceof ApiError) || (err.status !== 404 && err.status !== 405)) return null;
    const detail = err.problem && err.problem.detail;
    // The router's own 404 ("Not Found") means this gateway has no such API at all.
    return detail && detail !== "Not Found"
      ? `Not available on this gateway: ${detail}.`
      : "Not available on this gateway: this version has no typed API for it.";
  }

  function kamPart(id, title, explain) {
    return h("div", { id, class: "kam-part" }, h("h3", {}, title),
      h("p", { class: "explain" }, explain), h("div", { class: "kam-content" }, h("p", { class: "muted" }, "reading…")));
  }

  function buildKamailio() {
    $("kamailio-body").replaceChildren(h("div", { class: "kam-grid" },
      kamPart("kam-htable", "Shared tables (htable)",
        "Key-value tables Kamailio nodes replicate over the bus, as this gateway holds them. " +
        "A write is sent to every node, as Kamailio's own htable actions."),
      kamPart("kam-registrations", "Registrations (usrloc)",
        "Where each user (address of record, AOR) is registered, anywhere on the bus."),
      kamPart("kam-dialogs", "Dialogs",
        "Calls in progress that the Kamailio nodes share, counted by state.")));
  }

  function kamContent(id) { return document.querySelector(`#${id} .kam-content`); }

  async function kamRead(id, path, render) {
    const box = kamContent(id);
    try {
      const { data } = await api("GET", path);
      render(box, data);
      box.closest(".kam-part").setAttribute("data-state", "available");
    } catch (err) {
      if (err instanceof AuthError) { askToken("The gateway refused the token: " + err.message); return; }
      const missing = kamNotAvailable(err);
      box.closest(".kam-part").setAttribute("data-state", missing ? "unavailable" : "error");
      box.replaceChildren(h("p", { class: missing ? "muted" : "result bad" }, missing || err.message));
    }
  }

  function syncLine(sync) {
    if (!sync) return null;
    const text = {
      waiting: "waiting for a Kamailio node to copy the state from",
      requesting: "asking a Kamailio node for its state",
      synced: `copied from ${sync.donor || "a node"}, then kept up to date`,
      failed: "no node answered the request for its state; kept from updates only",
    }[sync.state] || sync.state;
    return h("p", { class: "hint", "data-sync": sync.state }, "State: " + text + ".");
  }

  function refreshKamailio(force) {
    if (!force && kam.round++ % KAM_EVERY !== 0) return;
    kamRead("kam-htable", "/v1/htable", renderTables);
    kamRead("kam-registrations", "/v1/registrations?limit=1", renderRegistrations);
    kamRead("kam-dialogs", "/v1/dialogs?limit=1", renderDialogs);
  }

  // ---- htable
  function renderTables(box, data) {
    if (!box.querySelector(".kam-tables")) {
      box.replaceChildren(
        h("div", { class: "kam-tables" }),
        h("div", { class: "kam-keys" }, h("p", { class: "muted" }, "Choose a table to see its keys.")),
        htableForm());
    }
    const tables = data.tables.map((t) => h("tr", { "data-table": t.table, class: t.table === kam.table ? "selected" : null },
      h("td", {}, h("button", { type: "button", class: "link-button", onclick: () => openTable(t.table) }, t.table)),
      h("td", { class: "num" }, fmtInt(t.cells)),
      h("td", {}, t.autoexpire ? `${t.autoexpire} s` : t.expiring ? "yes" : "no")));
    box.querySelector(".kam-tables").replaceChildren(
      syncLine(data.sync),
      data.tables.length
        ? h("table", { class: "grid" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Table"), h("th", { scope: "col", class: "num" }, "Keys"),
            h("th", { scope: "col", title: "whether its keys expire (--htable-autoexpire, or seen in a sync)" }, "Expiry"))),
          h("tbody", {}, ...tables))
        : h("p", { class: "muted" }, "No table yet: none was set or copied since the gateway started."));
    if (kam.table) readKeys();
  }

  function openTable(name) {
    kam.table = name;
    kam.prefix = "";
    kam.pages = [null];
    kam.page = 0;
    document.querySelectorAll("#kam-htable tr[data-table]").forEach((tr) =>
      tr.classList.toggle("selected", tr.getAttribute("data-table") === name));
    const form = document.querySelector("#kam-htable .kam-write");
    if (form) form.elements.table.value = name;
    readKeys();
  }

  async function readKeys() {
    const box = document.querySelector("#kam-htable .kam-keys");
    if (!box || !kam.table) return;
    const query = new URLSearchParams({ limit: "25" });
    if (kam.prefix) query.set("prefix", kam.prefix);
    const after = kam.pages[kam.page];
    if (after) query.set("after", after);
    let data;
    try {
      ({ data } = await api("GET", `/v1/htable/${encodeURIComponent(kam.table)}?${query}`));
    } catch (err) {
      if (err instanceof AuthError) return;
      box.replaceChildren(h("p", { class: "result bad" }, err.message));
      return;
    }
    const table = kam.table;
    const filter = h("form", { class: "inline-form", onsubmit: (e) => {
      e.preventDefault();
      kam.prefix = e.target.elements.prefix.value;
      kam.pages = [null];
      kam.page = 0;
      readKeys();
    } },
      h("label", { for: "kam-prefix" }, "Keys starting with"),
      h("input", { id: "kam-prefix", name: "prefix", value: kam.prefix, spellcheck: "false" }),
      h("button", { type: "submit", class: "secondary" }, "Filter"));
    const rows = data.keys.map((cell) => h("tr", { "data-key": cell.key },
      h("td", { class: "mono" }, cell.key),
      h("td", { class: "mono" }, String(cell.value), cell.type === "int" ? h("span", { class: "hint" }, " (int)") : null),
      h("td", {}, cell.expires ? "in " + fmtDuration(cell.expires - Date.now() / 1000) : "never"),
      h("td", { class: "mono", title: "the node whose message set it" }, cell.source || "this gateway"),
      h("td", { class: "row-actions" }, h("button", {
        type: "button", class: "danger", "aria-label": `delete ${cell.key}`,
        onclick: () => deleteKey(table, cell.key),
      }, "Delete"))));
    const nav = h("div", { class: "buttons" },
      h("button", { type: "button", class: "secondary", disabled: kam.page === 0,
        onclick: () => { kam.page--; readKeys(); } }, "Previous"),
      h("span", { class: "hint" }, `${fmtInt(data.cells)} key(s)` + (kam.prefix ? ` starting with “${kam.prefix}”` : "")),
      h("button", { type: "button", class: "secondary", disabled: !data.next,
        onclick: () => { kam.pages[kam.page + 1] = data.next; kam.page++; readKeys(); } }, "Next"));
    const focused = document.activeElement && document.activeElement.id === "kam-prefix";
    box.replaceChildren(h("h4", {}, "Table ", h("span", { class: "mono" }, table)), filter,
      rows.length
        ? h("table", { class: "grid" }, h("thead", {}, h("tr", {},
          ...["Key", "Value", "Expires", "Set by"].map((t) => h("th", { scope: "col" }, t)), h("th", {}, h("span", { class: "sr" }, "actions")))),
          h("tbody", {}, ...rows))
        : h("p", { class: "muted" }, "No key."),
      nav);
    if (focused) $("kam-prefix").focus();
  }

  function htableForm() {
    const form = h("form", { class: "stack-form kam-write", autocomplete: "off" },
      h("h4", {}, "Set a key on every node"),
      h("label", {}, "Table", h("input", { name: "table", required: true, spellcheck: "false", value: kam.table || "" })),
      h("label", {}, "Key", h("input", { name: "key", required: true, spellcheck: "false" })),
      h("label", {}, "Value", h("input", { name: "value", spellcheck: "false" })),
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "integer" }), "the value is an integer"),
      h("label", {}, "Expires in (s, optional)", h("input", { name: "expires", type: "number", min: "1" })),
      h("div", { class: "buttons" }, h("button", { type: "submit" }, "Set key"),
        h("span", { class: "result", role: "status", id: "kam-write-result" })));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const f = form.elements;
      const body = { value: f.integer.checked ? Number(f.value.value) : f.value.value };
      if (f.expires.value) body.expires = Number(f.expires.value);
      const table = f.table.value.trim();
      const key = f.key.value;
      try {
        const { data } = await api("PUT", `/v1/htable/${encodeURIComponent(table)}/${key.split("/").map(encodeURIComponent).join("/")}`, { json: body });
        formResult("kam-write-result", `Set ${key} in ${table}: ${writeSummary(data)}`, true);
        if (!kam.table) kam.table = table;
        refreshKamailio(true);
      } catch (err) {
        handleActionError(err, "kam-write-result");
      }
    });
    return form;
  }

  function writeSummary(data) {
    const results = (data.results && data.results.results) || [];
    const ok = results.filter((r) => r.code !== null && r.code >= 200 && r.code < 300).length;
    const queued = results.filter((r) => r.outcome === "queued").length;
    if (!results.length) return "no other node on the bus.";
    return `${ok} of ${results.length} node(s) answered 2xx` +
      (queued ? `; ${queued} queued for a node that is down, resent when it answers.` : ".");
  }

  async function deleteKey(table, key) {
    if (!confirm(`Delete ${key} from table ${table} on every node of the bus?`)) return;
    try {
      const { data } = await api("DELETE", `/v1/htable/${encodeURIComponent(table)}/${key.split("/").map(encodeURIComponent).join("/")}`);
      formResult("kam-write-result", `Deleted ${key} from ${table}: ${writeSummary(data)}`, true);
      refreshKamailio(true);
    } catch (err) {
      handleActionError(err, "kam-write-result");
    }
  }

  // ---- registrations
  function renderRegistrations(box, data) {
    if (!box.querySelector(".kam-counts")) {
      const form = h("form", { class: "inline-form", autocomplete: "off", onsubmit: (e) => {
        e.preventDefault();
        kam.aor = e.target.elements.aor.value.trim();
        lookupAor();
      } },
        h("label", { for: "kam-aor" }, "Look up an AOR"),
        h("input", { id: "kam-aor", name: "aor", required: true, placeholder: "alice or alice@example.com", spellcheck: "false" }),
        h("button", { type: "submit" }, "Look up"));
      box.replaceChildren(h("div", { class: "kam-counts" }), form, h("div", { class: "kam-aor", role: "status" }));
    }
    box.querySelector(".kam-counts").replaceChildren(
      h("p", {}, h("strong", { "data-count": "aors" }, fmtInt(data.aors)), " AOR(s) with ",
        h("strong", { "data-count": "contacts" }, fmtInt(data.contacts)), " contact(s)."),
      syncLine(data.sync));
  }

  async function lookupAor() {
    const out = document.querySelector("#kam-registrations .kam-aor");
    if (!kam.aor) return;
    try {
      const { data } = await api("GET", "/v1/registrations/" + encodeURIComponent(kam.aor));
      out.replaceChildren(h("table", { class: "grid" },
        h("thead", {}, h("tr", {}, ...["Contact", "Expires", "User agent", "Registered on"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, ...data.contacts.map((c) => h("tr", { "data-ruid": c.ruid },
          h("td", { class: "mono" }, c.contact, c.received ? h("span", { class: "peer-desc" }, "from " + c.received) : null),
          h("td", {}, c.expires ? "in " + fmtDuration(c.expires - Date.now() / 1000) : "permanent"),
          h("td", {}, c.user_agent || "–"),
          h("td", { class: "mono" }, c.node))))));
    } catch (err) {
      if (err instanceof AuthError) { askToken("The gateway refused the token: " + err.message); return; }
      out.replaceChildren(h("p", { class: err.status === 404 ? "muted" : "result bad" },
        err.status === 404 ? `${kam.aor} is not registered anywhere on the bus.` : err.message));
    }
  }

  // ---- dialogs
  const DIALOG_STATES = {
    unconfirmed: "unconfirmed (INVITE sent)",
    early: "early (ringing)",
    confirmed_na: "answered, ACK not seen yet",
    confirmed: "confirmed (in a call)",
    deleted: "ended (kept a while)",
  };
  function renderDialogs(box, data) {
    const states = Object.entries(data.counts || {});
    box.replaceChildren(
      h("p", {}, h("strong", { "data-count": "dialogs" }, fmtInt(data.total)), " dialog(s) up."),
      states.length
        ? h("table", { class: "grid" }, h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "State"), h("th", { scope: "col", class: "num" }, "Dialogs"))),
          h("tbody", {}, ...states.map(([state, count]) => h("tr", { "data-state": state },
            h("td", {}, DIALOG_STATES[state] || state), h("td", { class: "num" }, fmtInt(count))))))
        : null);
  }

  // ------------------------------------------------------------------ start
  $("forget-token").hidden = !token;
  startPolling();
})();
