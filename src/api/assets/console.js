// The pulso console: operator data from GET /api/console (polled), live
// charts and a message tail from one /ws connection, and a publish form.
// Everything is drawn with textContent (never innerHTML): topic names and
// payloads come from clients.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "pulso.console.token";
  const POLL_MS = 2000;
  const DEMO_TOPIC = "metricas/demo";
  const TEMPERATURE_FILTER = "temperature/#";
  const DEMO_WINDOW_S = 120;
  const TEMPERATURE_WINDOW_S = 600;
  const CONNECTIONS_WINDOW_S = 600;
  const MIN_SPAN_S = 30;
  const MAX_POINTS = 1200;
  const MAX_TEMPERATURE_SERIES = 8;
  const TAIL_ROWS = 200;
  const PALETTE = ["#e4572e", "#17a2b8", "#6f42c1", "#28a745", "#fd7e14", "#20c997", "#d63384", "#6c757d"];

  let token = "";
  let ws = null;
  let wanted = false; // the operator asked to be connected
  let retry = 0;
  let retryTimer = null;
  let pollTimer = null;
  let lastApi = null;
  let skew = 0; // server clock minus this browser's, from message timestamps (s)

  // ---------------------------------------------------------------- utils

  function nowS() {
    return Date.now() / 1000 + skew;
  }

  function fmt(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : String(n);
  }

  function duration(s) {
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  }

  /** A time axis label: 24-hour local time, seconds included. */
  function hms(s) {
    return new Date(s * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  function clockTime(ms) {
    const d = new Date(ms);
    return d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  /** The number a payload stands for, or null: a number, a numeric string,
   *  or an object's value / celsius / temperature / temp field. */
  function numeric(payload) {
    if (typeof payload === "number") return Number.isFinite(payload) ? payload : null;
    if (typeof payload === "string" && payload.trim() !== "") {
      const n = Number(payload);
      return Number.isFinite(n) ? n : null;
    }
    if (payload && typeof payload === "object") {
      for (const k of ["value", "celsius", "temperature", "temp"]) {
        if (typeof payload[k] === "number" && Number.isFinite(payload[k])) return payload[k];
      }
    }
    return null;
  }

  /** MQTT-style matching, as the server does it (SPEC §3): `+` is one
   *  level, a final `#` the rest (parent included); inside a longer level
   *  both are literal. */
  function matches(filter, topic) {
    const f = filter.split("/"), t = topic.split("/");
    for (let i = 0; i < f.length; i++) {
      if (f[i] === "#" && i === f.length - 1) return true;
      if (i >= t.length) return false;
      if (f[i] !== "+" && f[i] !== t[i]) return false;
    }
    return f.length === t.length;
  }

  function text(el, value, cls) {
    el.textContent = value;
    if (cls !== undefined) el.className = cls;
  }

  function cell(tr, value, cls) {
    const td = document.createElement("td");
    td.textContent = value;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  /** Fills a <dl> with [term, value, class?] rows. */
  function describe(dl, rows) {
    dl.replaceChildren();
    for (const [term, value, cls] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      if (cls) dd.className = cls;
      dl.append(dt, dd);
    }
  }

  // --------------------------------------------------------------- charts

  /** A uPlot time chart of one or more series sharing one x array. */
  function timeChart(el, seriesOpts, windowS) {
    const data = [[]];
    const opts = {
      width: Math.max(el.clientWidth, 300),
      height: 220,
      scales: { x: { time: true } },
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      series: [{}],
      axes: [
        { stroke: "#6b7482", grid: { stroke: "#eef1f4" }, space: 80, values: (u, splits) => splits.map(hms) },
        { stroke: "#6b7482", grid: { stroke: "#eef1f4" }, size: 56 },
      ],
    };
    const chart = { el, data, windowS, names: [], plot: null };
    chart.plot = new uPlot(opts, data, el);
    for (const s of seriesOpts) addSeries(chart, s.label, s.stroke, s.fill);
    return chart;
  }

  function addSeries(chart, label, stroke, fill) {
    chart.names.push(label);
    chart.data.push(new Array(chart.data[0].length).fill(null));
    chart.plot.addSeries({ label, stroke, fill, width: 2, spanGaps: true, points: { size: 4 } });
  }

  /** Adds a point at x (seconds): `values[s]` for series s+1, null for
   *  those it leaves out. */
  function pushRow(chart, x, values) {
    const xs = chart.data[0];
    // Timestamps from several sources may arrive a little out of order:
    // keep x sorted, as uPlot needs.
    let at = xs.length;
    while (at > 0 && xs[at - 1] > x) at--;
    xs.splice(at, 0, x);
    for (let s = 1; s < chart.data.length; s++) {
      const v = values[s - 1];
      chart.data[s].splice(at, 0, v === undefined ? null : v);
    }
    prune(chart);
  }

  /** Adds one point to series `i` (1-based). */
  function push(chart, x, i, y) {
    const values = [];
    values[i - 1] = y;
    pushRow(chart, x, values);
  }

  function prune(chart) {
    const xs = chart.data[0];
    const oldest = nowS() - chart.windowS;
    let drop = 0;
    while (drop < xs.length && (xs[drop] < oldest || xs.length - drop > MAX_POINTS)) drop++;
    if (drop) for (const arr of chart.data) arr.splice(0, drop);
  }

  /** Redraws with the x axis ending now, so the chart scrolls even when
   *  no message arrives. It spans its window, or less while the data is
   *  younger (at least MIN_SPAN_S), so a fresh page is not one sliver at
   *  the right edge. */
  function scroll(chart) {
    prune(chart);
    const max = nowS();
    const first = chart.data[0].length ? chart.data[0][0] : max;
    const min = Math.min(max - MIN_SPAN_S, Math.max(max - chart.windowS, first));
    chart.plot.batch(() => {
      chart.plot.setData(chart.data, false);
      chart.plot.setScale("x", { min, max });
    });
  }

  const charts = {
    demo: timeChart($("chart-demo"), [{ label: DEMO_TOPIC, stroke: "#1769aa", fill: "rgba(23,105,170,0.08)" }], DEMO_WINDOW_S),
    temperature: timeChart($("chart-temperature"), [], TEMPERATURE_WINDOW_S),
    connections: timeChart($("chart-connections"), [
      { label: "/ws", stroke: "#1769aa" },
      { label: "Socket.IO", stroke: "#e4572e" },
    ], CONNECTIONS_WINDOW_S),
  };
  let temperatureOverflow = 0;

  function chartMessage(m) {
    const v = numeric(m.payload);
    const x = (typeof m.ts === "number" ? m.ts : Date.now()) / 1000;
    if (m.topic === DEMO_TOPIC) {
      $("last-demo").textContent = JSON.stringify(m.payload).slice(0, 80);
      if (v !== null) push(charts.demo, x, 1, v);
      return;
    }
    if (!matches(TEMPERATURE_FILTER, m.topic)) return;
    $("last-temperature").textContent = `${m.topic}: ${JSON.stringify(m.payload).slice(0, 60)}`;
    if (v === null) return;
    const c = charts.temperature;
    let i = c.names.indexOf(m.topic);
    if (i < 0) {
      if (c.names.length >= MAX_TEMPERATURE_SERIES) {
        temperatureOverflow++;
        return;
      }
      addSeries(c, m.topic, PALETTE[c.names.length % PALETTE.length]);
      i = c.names.length - 1;
    }
    push(c, x, i + 1, v);
  }

  setInterval(() => Object.values(charts).forEach(scroll), 1000);
  window.addEventListener("resize", () => {
    for (const c of Object.values(charts)) c.plot.setSize({ width: Math.max(c.el.clientWidth, 300), height: 220 });
  });

  // ----------------------------------------------------------------- tail

  let tailFilter = "#";
  let tailPaused = false;
  let tailPending = [];
  let tailCount = 0;
  let tailWindowStart = Date.now();

  function tailMessage(m) {
    if (!matches(tailFilter, m.topic)) return;
    tailCount++;
    if (tailPaused) return;
    tailPending.push(m);
    if (tailPending.length > TAIL_ROWS) tailPending.splice(0, tailPending.length - TAIL_ROWS);
  }

  // Rows are added a few times a second, not once per message.
  setInterval(() => {
    const elapsed = (Date.now() - tailWindowStart) / 1000;
    if (elapsed >= 2) {
      $("tail-rate").textContent = `${(tailCount / elapsed).toFixed(1)} msg/s`;
      tailCount = 0;
      tailWindowStart = Date.now();
    }
    if (!tailPending.length) return;
    const body = $("tail").tBodies[0];
    const batch = tailPending;
    tailPending = [];
    for (const m of batch) {
      const tr = document.createElement("tr");
      tr.dataset.topic = m.topic;
      cell(tr, clockTime(typeof m.ts === "number" ? m.ts : Date.now()));
      cell(tr, m.topic);
      cell(tr, m.event || "");
      cell(tr, JSON.stringify(m.payload).slice(0, 500));
      body.insertBefore(tr, body.firstChild);
    }
    while (body.rows.length > TAIL_ROWS) body.deleteRow(body.rows.length - 1);
  }, 250);

  const chartFilters = new Set([DEMO_TOPIC, TEMPERATURE_FILTER]);

  $("tail-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const next = $("tail-filter").value.trim();
    if (!next) return;
    if (ws && ws.readyState === WebSocket.OPEN) {
      if (!chartFilters.has(tailFilter)) ws.send(JSON.stringify({ type: "unsub", topic: tailFilter }));
      ws.send(JSON.stringify({ type: "sub", topic: next, id: "tail" }));
    }
    tailFilter = next;
    tailPending = [];
    $("tail-note").textContent = "";
    $("tail").tBodies[0].replaceChildren();
  });

  $("tail-pause").addEventListener("click", () => {
    tailPaused = !tailPaused;
    $("tail-pause").textContent = tailPaused ? "Resume" : "Pause";
  });

  // ------------------------------------------------------------ /ws link

  function openSocket() {
    clearTimeout(retryTimer);
    retryTimer = null;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const sock = new WebSocket(`${proto}//${location.host}/ws?token=${encodeURIComponent(token)}`);
    ws = sock;
    text($("state"), "connecting…");
    sock.onopen = () => {
      retry = 0;
      text($("state"), "live");
      sock.send(JSON.stringify({ type: "sub", topic: DEMO_TOPIC, id: "demo" }));
      sock.send(JSON.stringify({ type: "sub", topic: TEMPERATURE_FILTER, id: "temperature" }));
      sock.send(JSON.stringify({ type: "sub", topic: tailFilter, id: "tail" }));
    };
    sock.onmessage = (e) => {
      let m;
      try { m = JSON.parse(e.data); } catch { return; }
      if (typeof m.topic === "string") {
        if (typeof m.ts === "number") skew = m.ts / 1000 - Date.now() / 1000;
        chartMessage(m);
        tailMessage(m);
      } else if (m.type === "error") {
        const where = m.id === "tail" ? $("tail-note") : $("state");
        where.textContent = `${m.code}: ${m.message}`;
      }
    };
    sock.onclose = (e) => {
      if (ws !== sock) return;
      ws = null;
      if (!wanted) return;
      const wait = Math.min(1000 * 2 ** retry, 15000);
      retry++;
      text($("state"), `live feed closed (${e.code}${e.reason ? " " + e.reason : ""}); retrying in ${wait / 1000} s`);
      retryTimer = setTimeout(openSocket, wait);
    };
  }

  // ------------------------------------------------------- /api/console

  async function poll() {
    let res;
    try {
      res = await fetch("/api/console?top=15", { headers: { authorization: "Bearer " + token }, cache: "no-store" });
    } catch (e) {
      text($("ready"), "unreachable", "badge bad");
      return;
    }
    let body;
    try { body = await res.json(); } catch { body = null; }
    if (!res.ok) {
      const why = body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${res.status}`;
      text($("ready"), res.status === 401 || res.status === 403 ? "token refused" : "error", "badge bad");
      text($("state"), why);
      if (res.status === 401 || res.status === 403) {
        sessionStorage.removeItem(TOKEN_KEY);
        disconnect(why);
      }
      return;
    }
    lastApi = body;
    render(body);
    // The live feed opens once the token has been accepted here.
    if (wanted && ws === null && retryTimer === null) openSocket();
  }

  function render(d) {
    text($("node"), d.node);
    text($("version"), "v" + d.version);
    text($("uptime"), "up " + duration(d.uptime_seconds));
    const failing = Object.entries(d.checks).filter(([, v]) => v !== "ok");
    text($("ready"), d.ready ? "ready" : "not ready", d.ready ? "badge ok" : "badge bad");
    $("ready").title = failing.map(([k, v]) => `${k}: ${v}`).join("\n") || "every check passes";

    text($("c-ws"), fmt(d.connections.ws));
    text($("c-socketio"), fmt(d.connections.socketio));
    text($("c-subscriptions"), fmt(d.subscriptions));
    text($("c-topics"), fmt(d.topics));
    text($("c-published"), fmt(Object.values(d.messages.published).reduce((a, b) => a + b, 0)));
    $("c-published").title = Object.entries(d.messages.published).map(([k, v]) => `${k}: ${v}`).join("\n");
    text($("c-delivered"), fmt(d.messages.delivered));
    text($("c-dropped"), fmt(d.messages.dropped));
    pushRow(charts.connections, nowS(), [d.connections.ws, d.connections.socketio]);

    const top = $("top").tBodies[0];
    top.replaceChildren();
    for (const t of d.top) {
      const tr = document.createElement("tr");
      tr.dataset.topic = t.name;
      const name = cell(tr, t.name);
      if (t.wildcard) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "filter";
        name.appendChild(tag);
      }
      cell(tr, fmt(t.subscribers), "num");
      top.appendChild(tr);
    }
    if (!d.top.length) {
      const tr = document.createElement("tr");
      cell(tr, "no subscriptions", "muted");
      cell(tr, "");
      top.appendChild(tr);
    }

    const nodes = $("nodes").tBodies[0];
    nodes.replaceChildren();
    for (const n of d.cluster.nodes) {
      const tr = document.createElement("tr");
      tr.dataset.node = n.node;
      cell(tr, n.node + (n.self ? " (this node)" : ""));
      cell(tr, fmt(n.connections), "num");
      cell(tr, n.seen_at.replace("T", " ").replace(/\.\d+Z$/, "Z"));
      nodes.appendChild(tr);
    }
    text($("nodes-note"), d.cluster.error ? "node list unavailable: " + d.cluster.error : "");

    const m = d.mqtt;
    describe($("mqtt"), m.enabled ? [
      ["broker", `${m.tls ? "mqtts" : "mqtt"}://${m.broker}`],
      ["state", m.connected ? "connected" : "not connected", m.connected ? "ok-text" : "bad-text"],
      ["topics", m.topics.join(", ")],
      ["broker subscriptions", fmt(m.broker_subscriptions)],
      ["messages in / out", `${fmt(m.messages_in)} / ${fmt(m.messages_out)}`],
      ["reconnects", fmt(m.reconnects)],
      ["last values kept", fmt(m.last_value_topics)],
    ].concat(d.checks.mqtt && d.checks.mqtt !== "ok" ? [["why", d.checks.mqtt, "bad-text"]] : [])
      : [["state", "off (mqtt.url is not set)"]]);

    const p = d.presence;
    describe($("presence"), [
      ["store", p.store],
      ["state", p.status, p.status === "ok" ? "ok-text" : "bad-text"],
      ["writes ok / failed / dropped", `${fmt(p.writes.ok)} / ${fmt(p.writes.failed)} / ${fmt(p.writes.dropped)}`],
    ]);

    const c = d.cluster;
    describe($("cluster"), c.engine ? [
      ["backplane", c.engine],
      ["state", c.up ? "up" : "down", c.up ? "ok-text" : "bad-text"],
      ["live nodes", fmt(c.nodes.length)],
    ] : [["state", "single node (no cluster configured)"]]);

    const h = d.history;
    describe($("history"), [
      ["history", h.enabled ? h.topics.join(", ") : "off (history.topics is empty)"],
      ["messages kept", `${fmt(h.messages)} (${fmt(h.bytes)} bytes)`],
      ["recoveries", Object.entries(h.recoveries).map(([k, v]) => `${k} ${fmt(v)}`).join(", ")],
      ["Socket.IO sessions kept", fmt(h.socketio_recovery_sessions)],
    ]);
  }

  // --------------------------------------------------------- connecting

  function connect() {
    token = $("token").value.trim();
    if (!token) { text($("state"), "paste a publisher token first"); return; }
    sessionStorage.setItem(TOKEN_KEY, token);
    wanted = true;
    $("connect").textContent = "Disconnect";
    text($("state"), "checking the token…");
    clearInterval(pollTimer);
    poll();
    pollTimer = setInterval(poll, POLL_MS);
  }

  function disconnect(why) {
    wanted = false;
    clearInterval(pollTimer);
    clearTimeout(retryTimer);
    retryTimer = null;
    $("connect").textContent = "Connect";
    if (ws) {
      const sock = ws;
      ws = null;
      sock.close(1000);
    }
    text($("state"), why || "disconnected");
  }

  $("auth").addEventListener("submit", (e) => {
    e.preventDefault();
    if (wanted) { disconnect(); sessionStorage.removeItem(TOKEN_KEY); } else connect();
  });

  $("publish").addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = $("p-result");
    let payload;
    try {
      payload = JSON.parse($("p-payload").value);
    } catch (err) {
      text(out, "the payload is not JSON (quote a string: \"text\")", "bad-text");
      return;
    }
    const body = { topic: $("p-topic").value.trim(), payload };
    const event = $("p-event").value.trim();
    if (event) body.event = event;
    try {
      const res = await fetch("/api/publish", {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer " + (token || $("token").value.trim()) },
        body: JSON.stringify(body),
      });
      text(out, `${res.status} ${await res.text()}`, res.ok ? "ok-text" : "bad-text");
    } catch (err) {
      text(out, "request failed: " + err.message, "bad-text");
    }
  });

  // A token in the fragment (#token=…, never sent to the server) is taken
  // once and removed from the address bar.
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem(TOKEN_KEY, fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  if ($("token").value) connect();

  // For tests and the curious: what the charts hold and the last answer.
  window.__console = {
    series() {
      const pairs = (c, i) => c.data[0].map((x, k) => [x, c.data[i][k]]).filter(([, y]) => y !== null);
      const temperature = {};
      charts.temperature.names.forEach((name, i) => { temperature[name] = pairs(charts.temperature, i + 1); });
      return {
        demo: pairs(charts.demo, 1),
        temperature,
        connections: { ws: pairs(charts.connections, 1), socketio: pairs(charts.connections, 2) },
        temperatureOverflow,
      };
    },
    state: () => lastApi,
    live: () => ws !== null && ws.readyState === WebSocket.OPEN,
    plots: { demo: charts.demo.plot, temperature: charts.temperature.plot, connections: charts.connections.plot },
  };
})();
