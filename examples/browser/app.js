// mini-vllm browser client: pick a model, type a prompt, watch tokens stream, stop at will.
// Plain JavaScript, no build step. Frames are the JSON messages of docs/protocol.md.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let socket = null;
let nextId = 1;
let current = null; // { id, tokens } of the generation being shown

function setState(state, status) {
  document.body.dataset.state = state;
  if (status !== undefined) $("status").textContent = status;
  const connected = socket !== null && socket.readyState === WebSocket.OPEN;
  $("generate").disabled = !connected || state === "generating";
  $("stop").disabled = state !== "generating";
}

function send(frame) {
  socket.send(JSON.stringify(frame));
}

// A browser cannot set headers on a WebSocket, so the API key travels as a subprotocol:
// "mini-vllm.bearer." + base64url(UTF-8 of the key), without padding (valid whatever the key
// holds), offered beside "mini-vllm", the one the server answers with.
function subprotocols(key) {
  if (!key) return ["mini-vllm"];
  const bytes = new TextEncoder().encode(key);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  const encoded = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return ["mini-vllm", `mini-vllm.bearer.${encoded}`];
}

// Served by mini-vllm over http(s), the page talks to its own server; opened as a file, to the default one.
function defaultServer() {
  if (location.protocol === "http:" || location.protocol === "https:") {
    return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
  }
  return "ws://127.0.0.1:8000";
}

function connect() {
  if (socket !== null) socket.close();
  const url = $("server").value.trim();
  $("connection").textContent = "connecting…";
  let ws;
  try {
    ws = new WebSocket(url, subprotocols($("api-key").value));
  } catch (error) { // not a ws:// or wss:// URL
    socket = null;
    $("connection").textContent = `disconnected (${error.message})`;
    setState("disconnected");
    return;
  }
  socket = ws;
  let opened = false;
  ws.onopen = () => {
    opened = true;
    $("connection").textContent = "connected";
    setState("idle", "");
    send({ type: "models", id: "models" });
  };
  ws.onclose = (event) => {
    if (socket !== ws) return; // replaced by a newer connection
    // A refused handshake shows no status to a page: say what it may have been.
    const why = event.reason ? ` (${event.reason})`
      : opened ? "" : " (no server there, a missing or wrong API key, or this page's origin is not allowed)";
    $("connection").textContent = "disconnected" + why;
    current = null;
    setState("disconnected");
  };
  ws.onmessage = (event) => onFrame(JSON.parse(event.data));
}

function onFrame(frame) {
  switch (frame.type) {
    case "models": {
      const select = $("model");
      select.replaceChildren(...frame.models.map((m) => {
        const option = document.createElement("option");
        option.value = m.name;
        option.textContent = `${m.name} (max ${m.max_model_len} tokens)`;
        option.dataset.chat = m.has_chat_template;
        return option;
      }));
      break;
    }
    case "token":
      if (current && frame.id === current.id) {
        $("output").textContent += frame.text; // textContent: model output is never parsed as HTML
        current.tokens += frame.token_ids.length;
        $("status").textContent = `generating… ${current.tokens} tokens`;
      }
      break;
    case "done":
      if (current && frame.id === current.id) {
        const u = frame.usage;
        const reason = frame.finish_reason;
        const detail = frame.error ? `: ${frame.error.message}` : "";
        current = null;
        setState(reason === "cancelled" ? "cancelled" : reason === "error" ? "error" : "done",
          `${reason}${detail} (${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens)`);
      }
      break;
    case "error":
      if (frame.id === null || (current && frame.id === current.id)) {
        current = null;
        setState("error", `error ${frame.code}: ${frame.message}`);
      }
      break;
  }
}

function generate(event) {
  event.preventDefault();
  if (current !== null || socket === null) return;
  const id = `web-${nextId++}`;
  const sampling = {
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
  };
  const model = $("model").value || undefined;
  const prompt = $("prompt").value;
  const frame = $("chat").checked
    ? { type: "chat", id, model, messages: [{ role: "user", content: prompt }], ...sampling }
    : { type: "generate", id, model, prompt, ...sampling };
  current = { id, tokens: 0 };
  $("output").textContent = "";
  setState("generating", "generating…");
  send(frame);
}

function stop() {
  if (current !== null) send({ type: "cancel", id: current.id });
}

$("server").value = params.get("server") || defaultServer();
$("connect-form").addEventListener("submit", (e) => { e.preventDefault(); connect(); });
$("prompt-form").addEventListener("submit", generate);
$("stop").addEventListener("click", stop);
connect();
