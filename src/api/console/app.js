// The edgeinfer console: a chat playground over /v1/chat/completions (streamed) and live
// panels drawn from /metrics and /v1/usage. No dependencies; everything is served by the node.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], abort: null, samples: [], last: null };
const WINDOW = 120; // samples kept per chart (one a second)

const SAMPLE_TOOLS = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
      required: ["city"],
    },
  },
}];

// ---- the key and requests -------------------------------------------------------------

function key() { return sessionStorage.getItem("edgeinfer.key") || ""; }

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  if (key()) h.authorization = "Bearer " + key();
  return h;
}

function authFailed(status, body) {
  const el = $("auth-error");
  if (status === 401 || status === 403) {
    el.textContent = (body && body.error && body.error.message) || "This node needs an API key.";
    el.hidden = false;
    return true;
  }
  el.hidden = true;
  return false;
}

async function getJson(path) {
  const r = await fetch(path, { headers: headers(false) });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  authFailed(r.status, body);
  return { status: r.status, body };
}

// ---- the playground -------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("transcript").append(div);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return div;
}

function requestBody() {
  const body = {
    model: state.model || undefined,
    messages: [],
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  const system = $("system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...state.messages);
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  if ($("tools-on").checked) {
    body.tools = JSON.parse($("tools").value);
    body.tool_choice = "auto";
  }
  return body;
}

// Yields the JSON of each `data:` event of an SSE response until `[DONE]`; throws if the
// stream ends without it (a node that died mid-reply), so a cut reply is never taken whole.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the stream ended before the reply was complete");
    // CRLF or CR line ends become LF (a trailing CR may be half of a CRLF: keep it).
    buf = (buf + decoder.decode(value, { stream: true })).replace(/\r\n|\r(?!$)/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(l[5] === " " ? 6 : 5)).join("\n");
      if (!data) continue; // a comment (keep-alive) or an empty event
      if (data.trim() === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.abort) return;
  let body;
  try { body = requestBody(); } catch (e) { addMessage("error", "Tools are not valid JSON: " + e.message); return; }
  state.messages.push({ role: "user", content: text });
  body.messages.push({ role: "user", content: text });
  addMessage("user", text);
  $("prompt").value = "";
  const out = addMessage("assistant", "");
  const textEl = out.querySelector(".text");
  state.abort = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("reply-stats").textContent = "";
  const started = performance.now();
  let first = null, content = "", usage = null, finish = null;
  const calls = [];
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: state.abort.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      authFailed(r.status, err);
      throw new Error(`${r.status}: ${(err.error && err.error.message) || r.statusText}`);
    }
    for await (const chunk of sseEvents(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const d = choice.delta || {};
      if (first === null && (d.content || d.tool_calls)) first = performance.now();
      if (d.content) { content += d.content; textEl.textContent = content; }
      for (const tc of d.tool_calls || []) {
        const c = calls[tc.index] || (calls[tc.index] = { id: tc.id, type: "function", function: { name: "", arguments: "" } });
        if (tc.function && tc.function.name) c.function.name += tc.function.name;
        if (tc.function && tc.function.arguments) c.function.arguments += tc.function.arguments;
        renderCalls(out, calls);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      $("transcript").scrollTop = $("transcript").scrollHeight;
    }
    const msg = { role: "assistant", content: content || null };
    // Only whole calls go back into the conversation: arguments cut off by max_tokens
    // would make every later request a 400.
    const whole = calls.filter((c) => {
      try { const a = JSON.parse(c.function.arguments); return a !== null && typeof a === "object" && !Array.isArray(a); } catch (_) { return false; }
    });
    if (whole.length) msg.tool_calls = whole;
    if (!msg.content && !whole.length) msg.content = "";
    state.messages.push(msg);
    replyStats(started, first, usage, finish);
  } catch (e) {
    if (e.name === "AbortError") {
      $("reply-stats").textContent = "stopped";
      if (content) state.messages.push({ role: "assistant", content });
    } else {
      out.className = "msg error";
      textEl.textContent = e.message;
      state.messages.pop();
    }
  } finally {
    state.abort = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function renderCalls(out, calls) {
  let pre = out.querySelector("pre.tool");
  if (!pre) { pre = document.createElement("pre"); pre.className = "tool"; out.append(pre); }
  pre.textContent = calls.map((c) => `${c.function.name}(${c.function.arguments})`).join("\n");
}

function replyStats(started, first, usage, finish) {
  const end = performance.now();
  const parts = [];
  if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
  if (usage) {
    const secs = (end - (first || started)) / 1000;
    parts.push(`${usage.prompt_tokens} in (${(usage.prompt_tokens_details || {}).cached_tokens || 0} cached), ${usage.completion_tokens} out`);
    if (usage.completion_tokens > 1 && secs > 0) parts.push(`${(usage.completion_tokens / secs).toFixed(1)} tok/s`);
  }
  if (finish) parts.push(finish);
  $("reply-stats").textContent = parts.join(" · ");
}

// ---- live panels ------------------------------------------------------------------------

// Unlabelled samples of a Prometheus text page, by name.
function parseMetrics(text) {
  const m = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (match && !match[2]) m[match[1]] = Number(match[3]);
  }
  return m;
}

async function sample() {
  let m;
  try {
    // With --metrics-key, /metrics takes that key or the master key.
    const r = await fetch("/metrics", { headers: headers(false) });
    if (r.status === 401) {
      $("node-status").textContent = "metrics need the metrics or master key";
      $("node-status").className = "badge bad";
      return;
    }
    m = parseMetrics(await r.text());
  } catch (_) {
    $("node-status").textContent = "unreachable";
    $("node-status").className = "badge bad";
    return;
  }
  const now = performance.now() / 1000;
  const prev = state.last;
  state.last = { t: now, m };
  if (!prev) return;
  const dt = Math.max(now - prev.t, 1e-3);
  const delta = (name) => Math.max((m[name] || 0) - (prev.m[name] || 0), 0);
  const ttftCount = delta("edgeinfer_time_to_first_token_seconds_count");
  const queries = delta("edgeinfer_prefix_cache_queries_total");
  const s = {
    throughput: delta("edgeinfer_generation_tokens_total") / dt,
    ttft: ttftCount ? (delta("edgeinfer_time_to_first_token_seconds_sum") / ttftCount) * 1000 : null,
    running: m.edgeinfer_requests_running || 0,
    waiting: m.edgeinfer_requests_waiting || 0,
    kv: (m.edgeinfer_kv_cache_usage_ratio || 0) * 100,
    hits: queries ? (delta("edgeinfer_prefix_cache_hits_total") / queries) * 100 : null,
  };
  state.samples.push(s);
  if (state.samples.length > WINDOW) state.samples.shift();
  drawAll();
}

function drawAll() {
  const col = (k) => state.samples.map((s) => s[k]);
  const latest = state.samples[state.samples.length - 1];
  const fmt = (v, d = 1) => (v === null || v === undefined ? "–" : v.toFixed(d));
  // The last value seen of a series that is only there when something happened.
  const lastOf = (k) => { const v = col(k).filter((x) => x !== null); return v.length ? v[v.length - 1] : null; };
  draw("c-throughput", [{ values: col("throughput"), color: "#2f6fed" }]);
  $("v-throughput").textContent = fmt(latest.throughput);
  draw("c-ttft", [{ values: col("ttft"), color: "#7a5af8" }]);
  $("v-ttft").textContent = fmt(lastOf("ttft"), 0);
  draw("c-queue", [{ values: col("running"), color: "#12b76a" }, { values: col("waiting"), color: "#f79009" }]);
  $("v-queue").textContent = `${latest.running} / ${latest.waiting}`;
  draw("c-kv", [{ values: col("kv"), color: "#0ba5ec" }, { values: col("hits"), color: "#ee46bc" }], 100);
  $("v-kv").textContent = `${fmt(latest.kv)} / ${fmt(lastOf("hits"), 0)}`;
}

// A line chart of one or more series (nulls are gaps), scaled to the largest value.
function draw(id, series, fixedMax) {
  const canvas = $(id);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 4;
  ctx.clearRect(0, 0, w, h);
  let max = fixedMax || 0;
  if (!fixedMax) for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.15 : 1;
  ctx.strokeStyle = "#eaecf0";
  ctx.fillStyle = "#98a2b3";
  ctx.font = "10px system-ui";
  for (let i = 0; i <= 2; i++) {
    const y = pad + ((h - 2 * pad) * i) / 2;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(((max * (2 - i)) / 2).toPrecision(3), 2, y + (i === 0 ? 10 : -2));
  }
  const step = (w - 2 * pad) / (WINDOW - 1);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    let pen = false;
    const offset = WINDOW - s.values.length;
    const lonely = [];
    s.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = pad + (offset + i) * step, y = h - pad - ((h - 2 * pad) * v) / max;
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      const prev = s.values[i - 1], next = s.values[i + 1];
      if ((prev === null || prev === undefined) && (next === null || next === undefined)) lonely.push([x, y]);
      pen = true;
    });
    ctx.stroke();
    // A sample with gaps on both sides (a TTFT in an otherwise quiet second) is a dot.
    ctx.fillStyle = s.color;
    for (const [x, y] of lonely) { ctx.beginPath(); ctx.arc(x, y, 2.5, 0, 2 * Math.PI); ctx.fill(); }
  }
  canvas.dataset.points = String(series[0].values.length);
  canvas.dataset.latest = String(series[0].values[series[0].values.length - 1]);
}

async function refreshUsage() {
  // The last 30 days (UTC), this one included: a report that reads those days' rows alone.
  const since = new Date(Date.now() - 29 * 86400e3).toISOString().slice(0, 10);
  const { status, body } = await getJson(`/v1/usage?start_date=${since}`).catch(() => ({ status: "unreachable", body: null }));
  const tbody = $("usage").querySelector("tbody");
  if (status !== 200 || !body || !Array.isArray(body.data)) { $("usage-note").textContent = `usage: ${status}`; return; }
  const byKey = new Map();
  for (const l of body.data) {
    const name = l.key_alias || (l.key_id ? l.key_id.slice(0, 12) + "…" : "(no key)");
    const t = byKey.get(name) || { requests: 0, prompt_tokens: 0, cached_tokens: 0, completion_tokens: 0, cost_usd: 0 };
    for (const k of Object.keys(t)) t[k] += l[k] || 0;
    byKey.set(name, t);
  }
  tbody.replaceChildren(...[...byKey].map(([name, t]) => {
    const tr = document.createElement("tr");
    for (const v of [name, t.requests, t.prompt_tokens, t.cached_tokens, t.completion_tokens, t.cost_usd.toFixed(6)]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.append(td);
    }
    return tr;
  }));
  $("usage-note").textContent = byKey.size ? "" : "No requests recorded yet.";
}

async function refreshStatus() {
  const r = await fetch("/ready").catch(() => null);
  const badge = $("node-status");
  const status = r ? (await r.json().catch(() => ({}))).status : "unreachable";
  badge.textContent = status || "?";
  badge.className = "badge " + (r && r.ok ? "ok" : "bad");
  if (!state.model && r) {
    const { status: code, body } = await getJson("/v1/models").catch(() => ({ status: 0, body: null }));
    if (code === 200 && body && Array.isArray(body.data) && body.data[0]) {
      state.model = body.data[0].id;
      $("model").textContent = `${state.model} · context ${body.data[0].context_length || "?"}`;
    }
  }
}

// ---- wiring ---------------------------------------------------------------------------

function init() {
  // Earlier versions kept the key in localStorage: remove it from there.
  localStorage.removeItem("edgeinfer.key");
  $("api-key").value = key();
  $("api-key").addEventListener("change", (e) => {
    sessionStorage.setItem("edgeinfer.key", e.target.value.trim());
    state.model = null;
    refreshStatus();
    refreshUsage();
  });
  $("tools").value = JSON.stringify(SAMPLE_TOOLS, null, 2);
  $("tools-on").addEventListener("change", (e) => { $("tools-box").hidden = !e.target.checked; });
  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("clear").addEventListener("click", () => { state.messages = []; $("transcript").replaceChildren(); $("reply-stats").textContent = ""; });
  refreshStatus();
  refreshUsage();
  sample();
  setInterval(sample, 1000);
  setInterval(refreshStatus, 5000);
  setInterval(refreshUsage, 5000);
}

init();
