// Aether's chat page: one WebSocket (/ws), the REST history routes, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null,
  connected: false,
  conversationId: null,
  current: null, // the request being answered: {id, el, text, block}
  retryMs: 500,
  key: sessionStorage.getItem("aether-key") || "",
};

function setStatus(text, warn) {
  $("status").textContent = text;
  $("status").classList.toggle("warn", Boolean(warn));
}

function authHeaders() {
  return state.key ? { Authorization: "Bearer " + state.key } : {};
}

function addTurn(role, text) {
  const el = document.createElement("article");
  el.className = "turn " + role;
  el.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text || "";
  el.appendChild(body);
  $("transcript").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function note(el, text, isError) {
  const span = document.createElement("span");
  span.className = isError ? "note error" : "note";
  span.textContent = text;
  el.appendChild(span);
}

function setBusy(busy) {
  $("send").disabled = busy || !state.connected;
  $("stop").disabled = !busy;
}

function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  const protocols = state.key ? ["aether.v2", "bearer." + state.key] : ["aether.v2"];
  const ws = new WebSocket(url, protocols);
  state.ws = ws;
  ws.onopen = () => { state.retryMs = 500; };
  ws.onmessage = (event) => handle(JSON.parse(event.data));
  ws.onclose = (event) => {
    state.connected = false;
    if (state.current) finishTurn("(connection lost)", true);
    setBusy(false);
    const wait = state.retryMs;
    state.retryMs = Math.min(state.retryMs * 2, 8000);
    const why = event.code === 1006 && !state.key ? " (an API key may be needed)" : "";
    setStatus("Disconnected" + why + "; reconnecting in " + Math.round(wait / 1000 * 10) / 10 + " s", true);
    setTimeout(connect, wait);
  };
}

function send(message) {
  if (state.ws && state.connected) state.ws.send(JSON.stringify(message));
}

function finishTurn(text, isError) {
  const turn = state.current;
  if (!turn) return;
  if (text) note(turn.el, text, isError);
  turn.el.dataset.state = isError ? "error" : (text || "done");
  state.current = null;
  setBusy(false);
  loadConversations();
}

function appendText(turn, text) {
  const bodies = turn.el.querySelectorAll(".body");
  const target = turn.block || bodies[bodies.length - 1];
  // A code or output block starts at its first line, not at the newline before it.
  target.textContent += target.textContent ? text : text.replace(/^\n+/, "");
  turn.el.scrollIntoView({ block: "end" });
}

function startTextBlock(turn) {
  // The first text block fills the turn's empty body; a later one (after code or output)
  // gets its own, so the answer reads in the order it was written.
  const first = turn.el.querySelector(".body");
  if (first === turn.el.lastElementChild && !first.textContent) {
    turn.block = first;
    return;
  }
  const body = document.createElement("div");
  body.className = "body";
  turn.el.appendChild(body);
  turn.block = body;
}

function handle(message) {
  const type = message.type;
  if (type === "hello") {
    state.connected = true;
    setStatus("Connected");
    setBusy(Boolean(state.current));
    loadConversations();
    return;
  }
  if (type === "keepalive" || type === "pong") return;
  if (type === "going_away") { setStatus("The server is restarting…", true); return; }
  if (message.id === null || message.id === undefined) {
    if (type === "error") {
      if (state.current && message.ref && message.ref.id === state.current.id) {
        finishTurn("Error: " + message.message, true);
      } else {
        setStatus("Error: " + message.message, true);
      }
    }
    return;
  }
  const turn = state.current;
  if (!turn || message.id !== turn.id) return;
  if (type === "accepted") {
    state.conversationId = message.conversation_id || state.conversationId;
  } else if (type === "confirmation") {
    askApproval(turn, message);
  } else if (message.start && type === "message") {
    startTextBlock(turn);
  } else if (message.start && (type === "code" || type === "console")) {
    const pre = document.createElement("pre");
    pre.className = type;
    pre.setAttribute("aria-label", type === "code" ? "Code" : "Output");
    turn.el.appendChild(pre);
    turn.block = pre;
  } else if (message.end) {
    turn.block = null;
  } else if (typeof message.content === "string") {
    appendText(turn, message.content);
  } else if (type === "completion") {
    finishTurn("");
  } else if (type === "stopped") {
    finishTurn("(stopped)");
  } else if (type === "error") {
    finishTurn("Error: " + message.message, true);
  }
}

function askApproval(turn, message) {
  const box = document.createElement("div");
  box.className = "confirm";
  const code = message.content && message.content.content ? message.content.content : "";
  const label = document.createElement("span");
  label.textContent = "Run this code?";
  const yes = document.createElement("button");
  yes.type = "button";
  yes.textContent = "Approve";
  const no = document.createElement("button");
  no.type = "button";
  no.textContent = "Deny";
  let answered = false;
  const answer = (approved) => {
    if (answered) return; // one answer per question, whatever the clicks
    answered = true;
    send({ type: "approve", id: turn.id, confirmation_id: message.confirmation_id, approved });
    box.remove();
    note(turn.el, approved ? "(approved)" : "(denied)");
  };
  yes.onclick = () => answer(true);
  no.onclick = () => answer(false);
  const shown = turn.el.querySelectorAll("pre.code");
  const streamed = shown.length && shown[shown.length - 1].textContent.trim() === code.trim();
  if (code && !streamed) {
    const pre = document.createElement("pre");
    pre.className = "code";
    pre.textContent = code;
    turn.el.appendChild(pre);
  }
  box.append(label, yes, no);
  turn.el.appendChild(box);
  yes.focus();
}

function startChat(text) {
  const id = "w-" + Math.random().toString(16).slice(2, 14);
  addTurn("user", text);
  const el = addTurn("assistant", "");
  state.current = { id, el, block: null };
  const message = { type: "chat", id, message: text };
  if (state.conversationId) message.conversation_id = state.conversationId;
  send(message);
  setBusy(true);
}

function stopChat() {
  if (state.current) send({ type: "stop", id: state.current.id });
}

async function loadConversations() {
  try {
    const response = await fetch("/v1/conversations?limit=50", { headers: authHeaders() });
    if (!response.ok) return;
    const page = await response.json();
    const list = $("conversations");
    list.replaceChildren();
    for (const conversation of page.conversations) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = conversation.title || conversation.id;
      button.onclick = () => openConversation(conversation.id);
      if (conversation.id === state.conversationId) button.setAttribute("aria-current", "true");
      item.appendChild(button);
      list.appendChild(item);
    }
  } catch (error) {
    // The list is a convenience: chatting works without it.
  }
}

async function openConversation(id) {
  const response = await fetch("/v1/chat/history?conversation_id=" + encodeURIComponent(id), {
    headers: authHeaders(),
  });
  if (!response.ok) { setStatus("Could not open that conversation", true); return; }
  const history = await response.json();
  state.conversationId = id;
  $("transcript").replaceChildren();
  for (const message of history.messages) {
    const el = addTurn(message.role, message.content);
    if (message.status !== "complete") note(el, "(" + message.status + ")", message.status === "error");
  }
  closeSidebar();
  loadConversations();
}

function closeSidebar() {
  $("sidebar").classList.remove("open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

function init() {
  $("api-key").value = state.key;
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (!text || state.current || !state.connected) return;
    $("message").value = "";
    startChat(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    } else if (event.key === "Escape") {
      stopChat();
    }
  });
  $("stop").addEventListener("click", stopChat);
  $("new-chat").addEventListener("click", () => {
    state.conversationId = null;
    $("transcript").replaceChildren();
    closeSidebar();
    $("message").focus();
  });
  $("save-key").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("aether-key", state.key);
    if (state.ws) state.ws.close();
  });
  $("toggle-sidebar").addEventListener("click", () => {
    const open = $("sidebar").classList.toggle("open");
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  });
  setBusy(false);
  connect();
}

document.addEventListener("DOMContentLoaded", init);
