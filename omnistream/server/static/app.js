// omnistream live page: camera or video file -> /v1/realtime (events: docs/realtime.md).
// Frames go out as JPEG data URLs with their wall-clock timestamp_ms; questions can be asked at
// any moment, answers stream in as response.output_text.delta, response.done brings metrics.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"), fps: $("fps"), maxPixels: $("max-pixels"), star: $("star-size"), stream: $("stream-size"),
  policy: $("policy"), file: $("file"), start: $("start"), stop: $("stop"), video: $("preview"), canvas: $("grab"),
  form: $("ask-form"), question: $("question"), maxTokens: $("max-tokens"), ask: $("ask"), answers: $("answers"),
  status: $("status"), log: $("log"), plot: $("ttft-plot"),
};
const MAX_SIDE = 640;          // frames are scaled down to this long side before JPEG encoding
const MAX_BUFFERED = 4 << 20;  // bytes queued on the socket above which a frame is skipped
const MAX_LOG = 50;

const state = {
  ws: null, stream: null, timer: null, t0: 0, framesSent: 0, nextEvent: 1,
  waiting: [],                 // answer <li>s whose response.created has not come yet
  byResponse: new Map(),       // response id -> <li>
  byEvent: new Map(),          // client event_id of a response.create -> <li>
  ttft: [],                    // [{n, ms}] one per answered question
};

// ------------------------------------------------------------------ connection
function socketUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const key = ui.key.value.trim();
  return `${proto}//${location.host}/v1/realtime` + (key ? `?api_key=${encodeURIComponent(key)}` : "");
}

function send(event) {
  const id = `evt_${state.nextEvent++}`;
  state.ws.send(JSON.stringify({ event_id: id, ...event }));
  return id;
}

function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = `status ${kind}`;
}

function log(text, isError) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (isError) li.className = "error";
  ui.log.prepend(li);
  while (ui.log.children.length > MAX_LOG) ui.log.lastChild.remove();
}

function connect() {
  setStatus("connecting", "off");
  const ws = new WebSocket(socketUrl());
  state.ws = ws;
  ws.onmessage = (msg) => onEvent(JSON.parse(msg.data));
  ws.onclose = (e) => {
    if (state.ws === ws) stop(`closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
  };
  ws.onerror = () => log("socket error", true);
}

function sessionSettings() {
  const s = { star_size: +ui.star.value, stream_size: +ui.stream.value, policy: ui.policy.value };
  if (ui.maxPixels.value) s.max_pixels = +ui.maxPixels.value;
  return s;
}

// ------------------------------------------------------------------ server events
function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      log(`session ${ev.session.id} (${ev.session.model})`);
      send({ type: "session.update", session: sessionSettings() });
      break;
    case "session.updated":
      setStatus("live", "on");
      ui.ask.disabled = false;
      startCapture().catch((e) => { log(`camera: ${e.message || e}`, true); setStatus("no camera", "error"); });
      break;
    case "conversation.item.created":
      break;
    case "response.created": {
      const li = state.waiting.shift();
      if (li) { li.dataset.response = ev.response.id; state.byResponse.set(ev.response.id, li); }
      break;
    }
    case "response.output_text.delta": {
      const li = state.byResponse.get(ev.response_id);
      if (li) {
        li.querySelector(".text").textContent += ev.delta;
        li.dataset.deltas = (+li.dataset.deltas || 0) + 1;
      }
      break;
    }
    case "response.done": onDone(ev.response); break;
    case "error": onError(ev.error); break;
    default: log(`event ${ev.type}`);
  }
}

function onDone(resp) {
  const li = state.byResponse.get(resp.id);
  state.byResponse.delete(resp.id);
  const m = resp.metrics || {};
  if (li) {
    li.classList.remove("streaming");
    li.classList.add(resp.status === "failed" ? "failed" : "done");
    li.dataset.status = resp.status;
    if (resp.output_text !== undefined) li.dataset.final = resp.output_text;  // what the deltas must add up to
    li.querySelector(".meta").textContent = resp.status === "failed" ? "failed" :
      `${resp.status} · TTFT ${fmtMs(m.ttft_ms)} · ${resp.usage.output_tokens} tokens · ` +
      `${m.frames_in_context ?? "-"} frames in context`;
  }
  if (m.frames_received !== undefined) $("m-frames-received").textContent = m.frames_received;
  if (m.star_size !== undefined) {
    $("m-star").textContent = m.star_size;
    $("m-stream").textContent = m.stream_size;
    $("m-compression").textContent = `${(+m.compression_ratio).toFixed(2)}x`;
    $("m-frames-encoded").textContent = m.frames_encoded;
    $("m-encode").textContent = fmtMs(m.encoding_ms);
  }
  if (m.ttft_ms !== undefined && m.ttft_ms !== null && resp.status !== "cancelled") {
    $("m-ttft").textContent = fmtMs(m.ttft_ms);
    state.ttft.push({ n: state.ttft.length + 1, ms: m.ttft_ms });
    drawPlot();
  }
}

function onError(err) {
  log(`${err.code || err.type}: ${err.message}`, true);
  const li = err.event_id && state.byEvent.get(err.event_id);
  if (li) {  // our response.create was refused: that question gets no response.created
    state.waiting = state.waiting.filter((x) => x !== li);
    li.classList.remove("streaming");
    li.classList.add("failed");
    li.querySelector(".text").textContent = err.message;
  }
}

const fmtMs = (ms) => (ms === null || ms === undefined ? "-" : `${(+ms).toFixed(1)} ms`);

// ------------------------------------------------------------------ frames
async function startCapture() {
  const useFile = $("source-file").checked;
  if (useFile) {
    const f = ui.file.files[0];
    if (!f) throw new Error("choose a video file first");
    ui.video.srcObject = null;
    ui.video.src = URL.createObjectURL(f);
    ui.video.loop = true;
  } else {
    state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    ui.video.srcObject = state.stream;
  }
  await ui.video.play();
  state.t0 = performance.now();
  const period = 1000 / Math.max(0.2, +ui.fps.value || 1);
  state.timer = setInterval(sendFrame, period);
  log(`${useFile ? "file" : "camera"} at ${(1000 / period).toFixed(1)} frames/s`);
}

function sendFrame() {
  const v = ui.video, ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || v.readyState < 2 || !v.videoWidth) return;
  if (ws.bufferedAmount > MAX_BUFFERED) return;  // the network is behind: drop this frame
  const scale = Math.min(1, MAX_SIDE / Math.max(v.videoWidth, v.videoHeight));
  const c = ui.canvas;
  c.width = Math.round(v.videoWidth * scale);
  c.height = Math.round(v.videoHeight * scale);
  c.getContext("2d").drawImage(v, 0, 0, c.width, c.height);
  const image = c.toDataURL("image/jpeg", 0.85);  // the server accepts the data URL prefix
  send({ type: "input_image_buffer.append", image, timestamp_ms: Math.round(performance.now() - state.t0) });
  state.framesSent += 1;
  $("m-frames-sent").textContent = state.framesSent;
}

function stopCapture() {
  clearInterval(state.timer);
  state.timer = null;
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.stream = null;
  ui.video.pause();
}

// ------------------------------------------------------------------ questions
function ask(text) {
  const li = document.createElement("li");
  li.className = "answer streaming";
  li.innerHTML = '<div class="q"></div><div class="text"></div><div class="meta">waiting</div>';
  li.querySelector(".q").textContent = text;
  ui.answers.prepend(li);
  state.waiting.push(li);
  send({ type: "conversation.item.create",
         item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  const id = send({ type: "response.create", response: { max_output_tokens: +ui.maxTokens.value || 64 } });
  state.byEvent.set(id, li);
}

// ------------------------------------------------------------------ TTFT plot (inline SVG)
function drawPlot() {
  const W = 320, H = 140, L = 38, B = 18, T = 8, R = 8;
  const pts = state.ttft.slice(-50);
  const maxMs = Math.max(...pts.map((p) => p.ms), 1) * 1.15;
  const x = (i) => L + (pts.length < 2 ? (W - L - R) / 2 : (i * (W - L - R)) / (pts.length - 1));
  const y = (ms) => H - B - (ms / maxMs) * (H - B - T);
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  ui.plot.replaceChildren(
    el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    el("text", { x: 2, y: T + 8 }, `${maxMs.toFixed(0)} ms`),
    el("text", { x: 2, y: H - B }, "0"),
    el("text", { x: L, y: H - 4 }, `question ${pts.length ? pts[0].n : ""}`),
    el("text", { x: W - R - 18, y: H - 4 }, pts.length ? `${pts[pts.length - 1].n}` : ""),
    el("polyline", { class: "line", points: pts.map((p, i) => `${x(i)},${y(p.ms)}`).join(" ") }),
    ...pts.map((p, i) => el("circle", { class: "dot", cx: x(i), cy: y(p.ms), r: 2.5 })),
  );
}

// ------------------------------------------------------------------ controls
function stop(reason) {
  stopCapture();
  const ws = state.ws;
  state.ws = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
  ui.start.disabled = false;
  ui.stop.disabled = true;
  ui.ask.disabled = true;
  setStatus("disconnected", "off");
  if (reason) log(reason);
}

document.querySelectorAll('input[name="source"]').forEach((r) =>
  r.addEventListener("change", () => { ui.file.disabled = !$("source-file").checked; }));
ui.start.addEventListener("click", () => {
  ui.start.disabled = true;
  ui.stop.disabled = false;
  connect();
});
ui.stop.addEventListener("click", () => stop("stopped"));
ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.question.value.trim();
  if (!text || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  ui.question.value = "";
  ask(text);
});
drawPlot();
