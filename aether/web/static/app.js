// Aether's chat page: one WebSocket (/ws) and the REST conversation routes. Answers are markdown,
// rendered as they stream by markdown-it, sanitised by DOMPurify, with code highlighted by
// highlight.js: the three are shipped in vendor/ (its README has their versions).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null,
  connected: false,
  conversationId: null,
  current: null, // the request being answered: {id, el, block, blocks, lastSeq, text}
  // A chat this tab was answering when it was reloaded: resumed from its start once connected.
  pending: null,
  retryMs: 500,
  key: sessionStorage.getItem("aether-key") || "",
  tools: null, // GET /v1/tools: the paths this server offers and its default
  follow: true, // keep the transcript's last line in view, until the reader scrolls up
  pinnedTop: 0, // where the page itself last scrolled the transcript to
  dirty: new Set(), // blocks to render at the next frame
  frame: 0,
  pause: 0, // a timer before the next frame's render, when renders are slow
  renderMs: 0, // how long the last render took
  deleting: null, // the conversation the delete dialog asks about
  renaming: null, // the conversation the rename dialog names
};

// The running chat of this tab, kept across a reload: {id, conversationId, text}.
const RUNNING_KEY = "aether-running";

function readRunning() {
  try {
    const running = JSON.parse(sessionStorage.getItem(RUNNING_KEY) || "null");
    return running && typeof running.id === "string" ? running : null;
  } catch (error) {
    return null;
  }
}

function keepRunning(turn) {
  if (turn) {
    const running = { id: turn.id, conversationId: state.conversationId, text: turn.text };
    sessionStorage.setItem(RUNNING_KEY, JSON.stringify(running));
  } else {
    sessionStorage.removeItem(RUNNING_KEY);
  }
}

const PATHS = {
  echo: "repeats your message",
  http: "the model server",
  oi: "Open Interpreter, can run code",
};

// What each error code means for the person reading it (the server's own message follows).
const ERRORS = {
  upstream_unavailable:
    "The model server could not be reached. Check that it runs and that AETHER_LLM_BASE_URL points at it.",
  upstream_http_error:
    "The model server refused the request. Check the model name (AETHER_LLM_MODEL) and its API key.",
  upstream_timeout:
    "The model server took too long to answer, or went silent in the middle. Try again.",
  upstream_disconnected:
    "The model server dropped the answer before it was complete. Try again.",
  upstream_protocol_error:
    "The model server's answer was not OpenAI-style streaming. Check that AETHER_LLM_BASE_URL is its OpenAI-compatible address (often ending in /v1).",
  path_unavailable: "That path is not available on this server: choose another one below.",
  provider_error: "The model path failed while answering.",
  internal_error: "The server failed while answering; its log has the details.",
  too_many_requests: "Too many chats are running: wait for one to finish.",
  rate_limited: "Messages arrive too fast: wait a moment, then send again.",
  message_too_large: "The message is larger than the server accepts: shorten it.",
  shutting_down: "The server is shutting down and takes no new chats: try again when it is back.",
  stale_confirmation: "That confirmation was no longer pending, so nothing ran.",
  unknown_conversation: "That conversation no longer exists: start a new chat.",
  unknown_request: "The server no longer knows that answer.",
  resumed_elsewhere: "This answer continues in another tab or window.",
};

// --- Markdown ---------------------------------------------------------------------------------

const markdown = window.markdownit ? createMarkdown() : null;
const PURIFY = {
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "code", "del", "em", "h2", "h3", "h4", "h5", "h6", "hr",
    "li", "ol", "p", "pre", "s", "span", "strong", "table", "tbody", "td", "th", "thead", "tr",
    "ul",
  ],
  ALLOWED_ATTR: ["href", "class", "start", "title"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  RETURN_DOM_FRAGMENT: true,
};

function createMarkdown() {
  const md = window.markdownit({
    html: false, // HTML in an answer is shown as text: a model's output is never markup to run
    linkify: true,
    highlight: (code, lang) => {
      const hljs = window.hljs;
      if (!hljs || !lang || !hljs.getLanguage(lang)) return ""; // markdown-it escapes it
      return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
    },
  });
  // Pictures are not loaded (the page's policy refuses other hosts, and a picture would tell its
  // host who read the answer): each shows as a link to its address.
  md.renderer.rules.image = (tokens, idx, options, env, self) => {
    const token = tokens[idx];
    const alt = self.renderInlineAsText(token.children, options, env) || "image";
    const src = md.utils.escapeHtml(token.attrGet("src") || "");
    return '<a href="' + src + '">' + md.utils.escapeHtml("Image: " + alt) + "</a>";
  };
  md.core.ruler.push("page_fit", (core) => {
    for (const token of core.tokens) {
      // An answer's headings rank below the page's own (its h1 is the page title).
      if (token.type === "heading_open" || token.type === "heading_close") {
        token.tag = "h" + Math.min(6, Number(token.tag.slice(1)) + 1);
      }
      // Table alignment as a class: the page's policy refuses style attributes.
      const match = /^text-align:(left|center|right)$/.exec(token.attrGet("style") || "");
      if (!match) continue;
      token.attrs = token.attrs.filter(([name]) => name !== "style");
      token.attrJoin("class", "align-" + match[1]);
    }
  });
  return md;
}

if (window.DOMPurify) {
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
}

function sanitized(html) {
  return window.DOMPurify.sanitize(html, PURIFY);
}

function codeBox(lang) {
  const box = document.createElement("div");
  box.className = "codeblock";
  const head = document.createElement("div");
  head.className = "code-head";
  const name = document.createElement("span");
  name.className = "lang";
  name.textContent = lang || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  const said = document.createElement("span");
  said.className = "said";
  said.textContent = "Copy";
  const what = document.createElement("span");
  what.className = "visually-hidden";
  what.textContent = " " + (lang ? lang + " " : "") + "code";
  copy.append(said, what);
  head.append(name, copy);
  box.append(head);
  return box;
}

// Each code block of rendered markdown gets a head with its language and a Copy button.
function decorate(fragment) {
  for (const pre of fragment.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (!code) continue;
    const match = /(?:^|\s)language-(\S+)/.exec(code.className);
    code.classList.add("hljs");
    pre.tabIndex = 0; // a long line scrolls: the keyboard can scroll it too
    const box = codeBox(match ? match[1] : "");
    pre.replaceWith(box);
    box.append(pre);
  }
}

// Replace only what changed: a streaming answer grows at its end, so the blocks before it stay
// as they are (with the focus, a selection, a "Copied" state) and only the last ones are redone.
function morph(target, fresh) {
  const next = Array.from(fresh.childNodes);
  let same = 0;
  while (
    same < target.childNodes.length && same < next.length &&
    target.childNodes[same].isEqualNode(next[same])
  ) same++;
  while (target.childNodes.length > same) target.lastChild.remove();
  target.append(...next.slice(same));
}

function renderBlock(block) {
  if (block.kind === "text") {
    if (!markdown || !window.DOMPurify) { block.el.textContent = block.text; return; }
    const fragment = sanitized(markdown.render(block.text));
    decorate(fragment);
    morph(block.el, fragment);
  } else if (block.kind === "code" && window.hljs && block.lang && window.hljs.getLanguage(block.lang)
    && window.DOMPurify) {
    const html = window.hljs.highlight(block.text, { language: block.lang, ignoreIllegals: true }).value;
    block.el.replaceChildren(sanitized(html));
  } else {
    block.el.textContent = block.text;
  }
}

function markDirty(block) {
  state.dirty.add(block);
  if (state.frame || state.pause) return;
  // A block is rendered whole, so a long answer costs more each time (about 10 ms at 10 kB,
  // 100 ms at 200 kB): renders then come less often, and the page keeps answering the reader.
  const pause = state.renderMs > 8 ? state.renderMs * 3 : 0;
  if (!pause) {
    state.frame = requestAnimationFrame(flushRenders);
    return;
  }
  state.pause = setTimeout(() => {
    state.pause = 0;
    state.frame = requestAnimationFrame(flushRenders);
  }, pause);
}

function flushRenders() {
  if (state.frame) cancelAnimationFrame(state.frame);
  clearTimeout(state.pause);
  state.frame = 0;
  state.pause = 0;
  if (state.dirty.size) {
    const start = performance.now();
    for (const block of state.dirty) renderBlock(block);
    state.dirty.clear();
    state.renderMs = performance.now() - start;
  }
  keepEndInView();
}

// --- The transcript ---------------------------------------------------------------------------

function atEnd(t) {
  return t.scrollHeight - t.scrollTop - t.clientHeight <= 24;
}

function keepEndInView() {
  const t = $("transcript");
  if (state.follow) {
    t.scrollTop = t.scrollHeight;
    state.pinnedTop = t.scrollTop;
  }
  $("jump").hidden = state.follow || atEnd(t);
}

function onTranscriptScroll() {
  const t = $("transcript");
  // Only the reader scrolls up: the page scrolls down, and content grows below.
  if (atEnd(t)) state.follow = true;
  else if (t.scrollTop < state.pinnedTop - 2) state.follow = false;
  $("jump").hidden = state.follow || atEnd(t);
}

function follow() {
  state.follow = true;
  keepEndInView();
}

function announce(text) {
  $("announce").textContent = text;
}

function setStatus(text, warn) {
  $("status").textContent = text;
  $("status").classList.toggle("warn", Boolean(warn));
}

function authHeaders() {
  return state.key ? { Authorization: "Bearer " + state.key } : {};
}

function describePath(path) {
  return PATHS[path] ? path + ": " + PATHS[path] : path;
}

function addTurn(role, text) {
  const el = document.createElement("article");
  el.className = "turn " + role;
  el.setAttribute("aria-label", role === "user" ? "You" : "Aether");
  const who = document.createElement("div");
  who.className = "who";
  const name = document.createElement("strong");
  name.textContent = role === "user" ? "You" : "Aether";
  const meta = document.createElement("span");
  meta.className = "meta";
  who.append(name, meta);
  const body = document.createElement("div");
  body.className = role === "user" ? "body" : "body md";
  el.append(who, body);
  $("turns").appendChild(el);
  $("empty").hidden = true;
  if (role === "user") {
    body.textContent = text || "";
  } else if (text) {
    renderBlock({ kind: "text", el: body, text });
  }
  return el;
}

// The model is named where the server says it (GET /v1/tools): the http and oi paths ask it.
function modelOf(path) {
  return state.tools && state.tools.model && (path === "http" || path === "oi") ? state.tools.model : null;
}

function setPath(turn, path, named) {
  const model = named || modelOf(path);
  turn.el.querySelector(".meta").textContent = "via the " + path + " path" + (model ? " · " + model : "");
  turn.el.setAttribute("aria-label", "Aether, via the " + path + " path" + (model ? ", model " + model : ""));
}

function note(el, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  el.appendChild(span);
}

// An error names its code, says what it means and what to do, and keeps the server's words.
function errorNote(el, code, detail, alert) {
  const box = document.createElement("div");
  box.className = "note error";
  if (alert) box.setAttribute("role", "alert");
  const title = document.createElement("strong");
  title.textContent = "Error";
  box.append(title);
  if (code) {
    const name = document.createElement("code");
    name.textContent = code;
    box.append(" ", name);
  }
  const help = ERRORS[code];
  box.append(": " + (help || detail || "the answer failed."));
  if (help && detail) box.append(" (Server: " + detail + ")");
  el.appendChild(box);
}

function setBusy(busy) {
  $("send").disabled = busy || !state.connected;
  $("stop").disabled = !busy;
}

function finishTurn(outcome) {
  const turn = state.current;
  if (!turn) return;
  flushRenders();
  if (outcome.error) errorNote(turn.el, outcome.code, outcome.message, true);
  else if (outcome.note) note(turn.el, outcome.note);
  turn.el.dataset.state = outcome.error ? "error" : outcome.note || "done";
  turn.el.removeAttribute("aria-busy");
  state.current = null;
  keepRunning(null);
  const focusWasOnStop = document.activeElement === $("stop");
  setBusy(false);
  if (focusWasOnStop || document.activeElement === document.body) $("message").focus();
  announce(outcome.error ? "The answer failed" : outcome.note === "(stopped)" ? "Answer stopped" : "Answer complete");
  keepEndInView();
  loadConversations();
}

function startBlock(turn, kind, lang) {
  if (kind === "text") {
    // The first text block fills the turn's empty body; a later one (after code or output)
    // gets its own, so the answer reads in the order it was written.
    const first = turn.el.querySelector(".body");
    if (turn.blocks === 0 && first === turn.el.lastElementChild) {
      turn.block = { kind, el: first, text: "" };
    } else {
      const body = document.createElement("div");
      body.className = "body md";
      turn.el.appendChild(body);
      turn.block = { kind, el: body, text: "" };
    }
  } else if (kind === "code") {
    const box = codeBox(lang);
    const pre = document.createElement("pre");
    pre.className = "code";
    pre.tabIndex = 0;
    const code = document.createElement("code");
    code.className = "hljs" + (lang ? " language-" + lang : "");
    pre.append(code);
    box.append(pre);
    turn.el.appendChild(box);
    turn.block = { kind, el: code, text: "", lang };
  } else {
    const label = document.createElement("span");
    label.className = "console-label";
    label.textContent = "Output";
    const pre = document.createElement("pre");
    pre.className = "console";
    turn.el.append(label, pre);
    turn.block = { kind, el: pre, text: "" };
  }
  turn.blocks += 1;
}

function appendText(turn, text) {
  if (!turn.block) startBlock(turn, "text");
  const block = turn.block;
  // A code or output block starts at its first line, not at the newline before it.
  block.text += block.text ? text : text.replace(/^\n+/, "");
  markDirty(block);
}

// --- The WebSocket ----------------------------------------------------------------------------

function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  const protocols = state.key ? ["aether.v2", "bearer." + state.key] : ["aether.v2"];
  const ws = new WebSocket(url, protocols);
  state.ws = ws;
  ws.onopen = () => { state.retryMs = 500; };
  ws.onmessage = (event) => handle(JSON.parse(event.data));
  ws.onclose = (event) => {
    state.connected = false;
    // A running answer goes on on the server for a while: it is resumed once reconnected.
    setBusy(Boolean(state.current));
    const wait = state.retryMs;
    state.retryMs = Math.min(state.retryMs * 2, 8000);
    const why = event.code === 1006 && !state.key ? " (an API key may be needed)" : "";
    const answer = state.current ? " (the answer continues once reconnected)" : "";
    setStatus("Disconnected" + why + "; reconnecting in " + Math.round(wait / 1000 * 10) / 10 + " s" + answer, true);
    setTimeout(connect, wait);
  };
}

function send(message) {
  if (state.ws && state.connected) state.ws.send(JSON.stringify(message));
}

function handle(message) {
  const type = message.type;
  if (type === "hello") {
    state.connected = true;
    setStatus("Connected");
    setBusy(Boolean(state.current));
    if (state.current) {
      resume(state.current);
    } else if (state.pending) {
      restoreRunning(state.pending);
      state.pending = null;
    }
    loadConversations();
    loadTools();
    loadModels();
    return;
  }
  if (type === "keepalive" || type === "pong") return;
  if (type === "going_away") { setStatus("The server is restarting…", true); return; }
  if (message.id === null || message.id === undefined) {
    if (type === "error") {
      if (state.current && message.ref && message.ref.id === state.current.id) {
        if (message.code === "resume_interrupted") resume(state.current); // again, from where it is
        else finishTurn({ error: true, code: message.code, message: message.message });
      } else {
        const help = ERRORS[message.code] || message.message;
        setStatus("Error " + message.code + ": " + help, true);
      }
    }
    return;
  }
  const turn = state.current;
  if (!turn || message.id !== turn.id) return;
  if (typeof message.seq === "number") turn.lastSeq = message.seq;
  if (type === "accepted") {
    state.conversationId = message.conversation_id || state.conversationId;
    keepRunning(turn);
    if (message.path) setPath(turn, message.path, message.model);
  } else if (type === "snapshot") {
    // The answer so far, standing for every message up to its seq (the server kept no more).
    turn.el.querySelector(".body").replaceChildren();
    turn.block = null;
    appendText(turn, message.content);
  } else if (type === "confirmation") {
    flushRenders();
    askApproval(turn, message);
  } else if (message.start && type === "message") {
    startBlock(turn, "text");
  } else if (message.start && (type === "code" || type === "console")) {
    startBlock(turn, type, typeof message.format === "string" ? message.format : "");
  } else if (message.end) {
    if (turn.block) { markDirty(turn.block); flushRenders(); }
    turn.block = null;
  } else if (typeof message.content === "string") {
    appendText(turn, message.content);
  } else if (type === "completion") {
    finishTurn({});
  } else if (type === "stopped") {
    finishTurn({ note: "(stopped)" });
  } else if (type === "error") {
    finishTurn({ error: true, code: message.code, message: message.message });
  }
}

function askApproval(turn, message) {
  const box = document.createElement("div");
  box.className = "confirm";
  box.setAttribute("role", "group");
  box.setAttribute("aria-label", "Run this code?");
  const code = message.content && message.content.content ? message.content.content : "";
  const label = document.createElement("span");
  label.textContent = "Run this code?";
  const yes = document.createElement("button");
  yes.type = "button";
  yes.textContent = "Approve";
  const no = document.createElement("button");
  no.type = "button";
  no.className = "secondary";
  no.textContent = "Deny";
  let answered = false;
  const answer = (approved) => {
    if (answered) return; // one answer per question, whatever the clicks
    answered = true;
    send({ type: "approve", id: turn.id, confirmation_id: message.confirmation_id, approved });
    box.remove();
    note(turn.el, approved ? "(approved)" : "(denied)");
    $("message").focus();
  };
  yes.onclick = () => answer(true);
  no.onclick = () => answer(false);
  const shown = turn.el.querySelectorAll("pre.code");
  const streamed = shown.length && shown[shown.length - 1].textContent.trim() === code.trim();
  if (code && !streamed) {
    const lang = message.content && typeof message.content.format === "string" ? message.content.format : "";
    startBlock(turn, "code", lang);
    turn.block.text = code;
    renderBlock(turn.block);
    turn.block = null;
  }
  box.append(label, yes, no);
  turn.el.appendChild(box);
  keepEndInView();
  yes.focus();
}

function startChat(text) {
  const id = "w-" + Math.random().toString(16).slice(2, 14);
  addTurn("user", text);
  const el = addTurn("assistant", "");
  el.setAttribute("aria-busy", "true");
  state.current = { id, el, block: null, blocks: 0, lastSeq: -1, text };
  keepRunning(state.current);
  state.renderMs = 0;
  const message = { type: "chat", id, message: text };
  if (state.conversationId) message.conversation_id = state.conversationId;
  if ($("path").value !== "auto") message.path = $("path").value;
  if ($("model").value) message.model = $("model").value;
  follow();
  send(message);
  setBusy(true);
}

// Pick the answer up after the last message this page has of it (all of it after a reload).
function resume(turn) {
  send({ type: "resume", id: turn.id, after_seq: turn.lastSeq });
  announce("Reconnected: the answer continues");
}

// After a reload: the conversation as stored, then the running answer replayed and followed.
async function restoreRunning(running) {
  if (running.conversationId) await openConversation(running.conversationId, running.id);
  addTurn("user", running.text);
  const el = addTurn("assistant", "");
  el.setAttribute("aria-busy", "true");
  state.current = { id: running.id, el, block: null, blocks: 0, lastSeq: -1, text: running.text };
  follow();
  setBusy(true);
  resume(state.current);
}

function stopChat() {
  if (!state.current) return;
  send({ type: "stop", id: state.current.id });
  announce("Stopping the answer");
}

// Leaving a conversation while it is answered stops the answer (nothing shows it any more).
function leaveCurrent() {
  if (!state.current) return;
  send({ type: "stop", id: state.current.id });
  state.current = null;
  keepRunning(null);
  setBusy(false);
}

function clearTranscript() {
  leaveCurrent();
  state.dirty.clear();
  $("turns").replaceChildren();
  $("empty").hidden = false;
  state.pinnedTop = 0;
  follow();
}

// --- Conversations ----------------------------------------------------------------------------

async function loadTools() {
  try {
    const response = await fetch("/v1/tools", { headers: authHeaders() });
    if (!response.ok) return;
    const tools = await response.json();
    state.tools = tools;
    const select = $("path");
    const chosen = select.value;
    select.replaceChildren();
    for (const path of tools.paths) {
      const text = path === "auto" ? "default (" + tools.default_path + ")" : describePath(path);
      select.add(new Option(text, path));
    }
    select.value = tools.paths.includes(chosen) ? chosen : "auto";
    const code = tools.code_execution || {};
    const model = modelOf(tools.default_path);
    const what = [PATHS[tools.default_path], model].filter(Boolean).join(", ");
    const runs = code.requires_approval ? "runs code only once you approve it" : "runs code without asking";
    $("empty-path").textContent =
      "Answers come from the " + tools.default_path + " path" + (what ? " (" + what + ")." : ".") +
      (code.available ? (tools.default_path === "oi" ? " It " : " The oi path ") + runs + "." : "");
  } catch (error) {
    // Without the catalog the page still chats on the server's default path.
  }
}

// The models the server answers with (GET /v1/models): a selector once there is a choice.
async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) return;
    const names = (await response.json()).data.map((model) => model.id);
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(new Option("default (" + names[0] + ")", ""));
    for (const name of names.slice(1)) select.add(new Option(name, name));
    select.value = names.includes(chosen) ? chosen : "";
    const choice = names.length > 1;
    select.hidden = !choice;
    $("model-label").hidden = !choice;
  } catch (error) {
    // Without the list the page chats with the server's default model.
  }
}

async function loadConversations() {
  try {
    const response = await fetch("/v1/conversations?limit=50", { headers: authHeaders() });
    if (!response.ok) return;
    const page = await response.json();
    const list = $("conversations");
    // The list is rebuilt: the focus, if it was in it, stays on the same row.
    const focused = document.activeElement && document.activeElement.closest("#conversations li");
    const focus = focused ? [focused.dataset.id, document.activeElement.className] : null;
    list.replaceChildren();
    for (const conversation of page.conversations) list.appendChild(conversationRow(conversation));
    $("no-conversations").hidden = page.conversations.length > 0;
    if (focus) {
      const row = Array.from(list.children).find((li) => li.dataset.id === focus[0]);
      const button = row && row.querySelector("button." + focus[1]);
      if (button) button.focus();
    }
  } catch (error) {
    // The list is a convenience: chatting works without it.
  }
}

function conversationRow(conversation) {
  const title = conversation.title || conversation.id;
  const item = document.createElement("li");
  item.dataset.id = conversation.id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.textContent = title;
  open.title = title;
  open.onclick = () => openConversation(conversation.id);
  if (conversation.id === state.conversationId) open.setAttribute("aria-current", "true");
  const rename = actionButton("rename", "✎", "Rename", title, "F2", () =>
    askRename(conversation.id, title),
  );
  const remove = actionButton("delete", "✕", "Delete", title, "Delete", () =>
    askDelete(conversation.id, title),
  );
  item.append(open, rename, remove);
  return item;
}

// A row's small button: its symbol shown, its action named for screen readers and its key.
function actionButton(className, symbol, action, title, key, onclick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = symbol;
  button.title = action;
  button.setAttribute("aria-label", action + " conversation: " + title);
  button.setAttribute("aria-keyshortcuts", key);
  button.onclick = onclick;
  return button;
}

// Arrow keys move through the list, F2 renames the focused conversation, Delete asks to delete it.
function onListKey(event) {
  const row = event.target.closest("li");
  if (!row) return;
  const rows = Array.from($("conversations").children);
  const index = rows.indexOf(row);
  const moves = { ArrowDown: index + 1, ArrowUp: index - 1, Home: 0, End: rows.length - 1 };
  if (event.key in moves) {
    const target = rows[Math.max(0, Math.min(rows.length - 1, moves[event.key]))];
    target.querySelector("button.open").focus();
    event.preventDefault();
  } else if (event.key === "Delete") {
    row.querySelector("button.delete").click();
    event.preventDefault();
  } else if (event.key === "F2") {
    row.querySelector("button.rename").click();
    event.preventDefault();
  }
}

function askRename(id, title) {
  state.renaming = { id, title };
  const dialog = $("rename");
  dialog.returnValue = "";
  $("rename-title").value = title;
  dialog.showModal();
  $("rename-title").select();
}

async function onRenameDialogClosed() {
  const target = state.renaming;
  state.renaming = null;
  if (!target) return;
  const title = $("rename-title").value.trim();
  const focusRow = () => {
    const row = Array.from($("conversations").children).find((li) => li.dataset.id === target.id);
    if (row) row.querySelector("button.open").focus();
  };
  if ($("rename").returnValue !== "rename" || !title || title === target.title) {
    focusRow();
    return;
  }
  const response = await fetch("/v1/conversations/" + encodeURIComponent(target.id), {
    method: "PATCH",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ title }),
  });
  if (!response.ok) {
    const code = await errorCode(response);
    setStatus("Could not rename that conversation (" + code + ")", true);
    focusRow();
    return;
  }
  announce("Renamed to “" + title + "”");
  await loadConversations();
  focusRow();
}

// ``skipRequest``: a turn not to show (the running one, which a resume replays).
async function openConversation(id, skipRequest) {
  const response = await fetch("/v1/chat/history?conversation_id=" + encodeURIComponent(id), {
    headers: authHeaders(),
  });
  if (!response.ok) {
    const code = await errorCode(response);
    setStatus("Could not open that conversation (" + code + ")", true);
    return;
  }
  const history = await response.json();
  clearTranscript();
  state.conversationId = id;
  for (const message of history.messages) {
    if (skipRequest && message.request_id === skipRequest) continue;
    const el = addTurn(message.role === "user" ? "user" : "assistant", message.content);
    if (message.error_code) errorNote(el, message.error_code, null, false);
    else if (message.status !== "complete") note(el, "(" + message.status + ")");
  }
  follow();
  closeSidebar();
  loadConversations();
  $("message").focus();
}

async function errorCode(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.code) || "HTTP " + response.status;
  } catch (error) {
    return "HTTP " + response.status;
  }
}

function askDelete(id, title) {
  if (state.current && state.conversationId === id) {
    announce("Stop the running answer before deleting its conversation.");
    setStatus("Stop the running answer before deleting its conversation", true);
    return;
  }
  state.deleting = { id, title };
  $("confirm-delete-text").textContent =
    "“" + title + "” and its files will be deleted from the server. This cannot be undone.";
  const dialog = $("confirm-delete");
  dialog.returnValue = "";
  dialog.showModal();
  $("cancel-delete").focus();
}

async function onDeleteDialogClosed() {
  const target = state.deleting;
  state.deleting = null;
  if (!target) return;
  const rows = Array.from($("conversations").children);
  const index = rows.findIndex((li) => li.dataset.id === target.id);
  if ($("confirm-delete").returnValue !== "delete") {
    const row = rows[index];
    if (row) row.querySelector("button.delete").focus();
    return;
  }
  const response = await fetch("/v1/conversations/" + encodeURIComponent(target.id), {
    method: "DELETE",
    headers: authHeaders(),
  });
  if (!response.ok && response.status !== 404) {
    const code = await errorCode(response);
    setStatus("Could not delete that conversation (" + code + ")", true);
    return;
  }
  if (state.conversationId === target.id) {
    clearTranscript();
    state.conversationId = null;
  }
  announce("Deleted “" + target.title + "”");
  await loadConversations();
  const left = Array.from($("conversations").children);
  const next = left[Math.min(index, left.length - 1)];
  (next ? next.querySelector("button.open") : $("new-chat")).focus();
}

function closeSidebar() {
  $("sidebar").classList.remove("open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

// --- Copying code ------------------------------------------------------------------------------

async function copyCode(button) {
  const code = button.closest(".codeblock").querySelector("pre");
  let copied = false;
  try {
    await navigator.clipboard.writeText(code.textContent);
    copied = true;
  } catch (error) {
    // Without clipboard access the code is selected, for Ctrl+C.
    const range = document.createRange();
    range.selectNodeContents(code);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
  }
  const said = button.querySelector(".said");
  said.textContent = copied ? "Copied" : "Selected";
  announce(copied ? "Code copied" : "Code selected: press Ctrl+C to copy it");
  setTimeout(() => { said.textContent = "Copy"; }, 2000);
}

// --- Start ------------------------------------------------------------------------------------

function init() {
  state.pending = readRunning();
  $("api-key").value = state.key;
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (!text || state.current || !state.connected) return;
    $("message").value = "";
    startChat(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  // Esc closes the side panel if it covers the page, else stops the answer, wherever the focus is.
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || $("confirm-delete").open || $("rename").open) return;
    if ($("sidebar").classList.contains("open")) {
      closeSidebar();
      $("toggle-sidebar").focus();
    } else if (state.current) {
      event.preventDefault();
      stopChat();
    }
  });
  $("stop").addEventListener("click", stopChat);
  $("new-chat").addEventListener("click", () => {
    clearTranscript();
    state.conversationId = null;
    closeSidebar();
    loadConversations();
    $("message").focus();
  });
  $("conversations").addEventListener("keydown", onListKey);
  $("cancel-delete").addEventListener("click", () => $("confirm-delete").close("cancel"));
  $("do-delete").addEventListener("click", () => $("confirm-delete").close("delete"));
  $("confirm-delete").addEventListener("close", onDeleteDialogClosed);
  $("cancel-rename").addEventListener("click", () => $("rename").close("cancel"));
  $("rename").addEventListener("close", onRenameDialogClosed);
  $("save-key").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("aether-key", state.key);
    if (state.ws) state.ws.close();
  });
  $("toggle-sidebar").addEventListener("click", () => {
    const open = $("sidebar").classList.toggle("open");
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
    if (open) $("new-chat").focus();
  });
  $("transcript").addEventListener("click", (event) => {
    const button = event.target.closest("button.copy");
    if (button) copyCode(button);
  });
  $("transcript").addEventListener("scroll", onTranscriptScroll, { passive: true });
  $("jump").addEventListener("click", () => { follow(); $("message").focus(); });
  // Whatever changes the transcript's size (a rendered block, a note, a narrower window, a taller
  // message box) keeps its last line in view while it is followed.
  const resized = new ResizeObserver(() => keepEndInView());
  resized.observe($("transcript"));
  resized.observe($("turns"));
  setBusy(false);
  connect();
}

document.addEventListener("DOMContentLoaded", init);
