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

function connect() {
  if (socket !== null) socket.close();
  const url = $("server").value.trim();
  $("connection").textContent = "connecting…";
  const ws = new WebSocket(url);
  socket = ws;
  ws.onopen = () => {
    $("connection").textContent = "connected";
    setState("idle", "");
    send({ type: "models", id: "models" });
  };
  ws.onclose = (event) => {
    if (socket !== ws) return; // replaced by a newer connection
    const why = event.reason ? ` (${event.reason})` : "";
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

$("server").value = params.get("server") || "ws://127.0.0.1:8000";
$("connect-form").addEventListener("submit", (e) => { e.preventDefault(); connect(); });
$("prompt-form").addEventListener("submit", generate);
$("stop").addEventListener("click", stop);
connect();
