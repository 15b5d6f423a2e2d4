// The chat page: conversations, the composer, per-conversation settings, and a streamed
// answer that can be stopped, regenerated, or redone from an edited message.
import { getJson, streamChat } from "./api.js";
import { withKey } from "./auth.js";
import { renderMessage } from "./messages.js";
import {
  currentId, exportJson, importJson, loadConversations, newConversation,
  saveConversations, setCurrentId, titleFor,
} from "./store.js";
import { setupTheme } from "./theme.js";

const $ = (id) => document.getElementById(id);
const NUMBER_SETTINGS = ["temperature", "top_p", "max_tokens", "seed"];
const JSON_SETTINGS = { json_schema: "a JSON schema object", tools: "a JSON list of tools" };

const state = {
  conversations: loadConversations(),
  current: null,
  model: null, // the served model's name, from /v1/models
  streaming: null, // { controller, message } while an answer streams
  editing: null, // the index of the user message being edited
};

function conversation() {
  return state.conversations.find((c) => c.id === state.current);
}

function save() {
  saveConversations(state.conversations);
}

function status(text) {
  $("status").textContent = text;
}

// --- the conversation list ---

function renderList() {
  const list = $("conversation-list");
  list.replaceChildren();
  const sorted = [...state.conversations].sort((a, b) => b.updated - a.updated);
  for (const item of sorted) {
    const li = document.createElement("li");
    if (item.id === state.current) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open-conversation";
    open.textContent = item.title;
    open.addEventListener("click", () => select(item.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete-conversation";
    remove.textContent = "×";
    remove.title = `Delete "${item.title}"`;
    remove.setAttribute("aria-label", remove.title);
    remove.addEventListener("click", () => removeConversation(item.id));
    li.append(open, remove);
    list.append(li);
  }
}

function select(id) {
  if (state.streaming) state.streaming.controller.abort();
  state.current = id;
  state.editing = null;
  setCurrentId(id);
  document.body.classList.remove("sidebar-open");
  renderAll();
}

function startConversation() {
  const fresh = newConversation();
  state.conversations.push(fresh);
  save();
  select(fresh.id);
  $("prompt").focus();
}

function removeConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  save();
  if (id === state.current) {
    if (state.conversations.length) select(state.conversations[0].id);
    else startConversation();
  } else renderList();
}

// --- messages ---

let renderQueued = false;

function renderMessages() {
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const conv = conversation();
  box.replaceChildren();
  if (!conv.messages.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = state.model
      ? `Send ${state.model} a message. Settings holds the system prompt, sampling and ` +
        "structured output of this conversation."
      : "Waiting for the server…";
    box.append(empty);
  }
  const busy = state.streaming !== null;
  conv.messages.forEach((message, index) => {
    const handlers = {
      edit: () => { state.editing = index; renderMessages(); },
      cancelEdit: () => { state.editing = null; renderMessages(); },
      resend: (text) => resend(index, text),
      regenerate: () => regenerate(),
    };
    box.append(renderMessage(message, handlers, {
      streaming: busy && state.streaming.message === message,
      busy,
      last: index === conv.messages.length - 1,
      editing: state.editing === index,
    }));
  });
  if (atBottom || busy) box.scrollTop = box.scrollHeight;
}

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderMessages();
  });
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// --- the request ---

function requestBody(conv) {
  const settings = conv.settings;
  const messages = [];
  if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
  for (const message of conv.messages.slice(0, -1)) {
    messages.push({ role: message.role, content: message.content });
  }
  const body = { model: state.model, messages, stream: true,
    stream_options: { include_usage: true } };
  for (const field of NUMBER_SETTINGS) {
    if (settings[field] !== null) body[field] = settings[field];
  }
  if (settings.json_schema.trim()) {
    body.response_format = { type: "json_schema",
      json_schema: { name: "response", schema: JSON.parse(settings.json_schema), strict: true } };
  }
  if (settings.tools.trim()) body.tools = JSON.parse(settings.tools);
  return body;
}

function absorb(message, chunk, timing) {
  for (const choice of chunk.choices || []) {
    const delta = choice.delta || {};
    const reasoning = delta.reasoning_content ?? delta.reasoning;
    if (reasoning) message.reasoning = (message.reasoning || "") + reasoning;
    if (delta.content) message.content += delta.content;
    for (const call of delta.tool_calls || []) {
      message.tool_calls = message.tool_calls || [];
      const slot = message.tool_calls[call.index ?? 0] ||= { name: "", arguments: "" };
      if (call.function?.name) slot.name += call.function.name;
      if (call.function?.arguments) slot.arguments += call.function.arguments;
    }
    if ((reasoning || delta.content || delta.tool_calls) && timing.first === null) {
      timing.first = performance.now();
    }
    if (choice.finish_reason) timing.finish = choice.finish_reason;
  }
  if (chunk.usage) timing.usage = chunk.usage;
}

function figures(timing, end) {
  const stats = {};
  const usage = timing.usage;
  if (timing.first !== null) stats.ttft_ms = timing.first - timing.start;
  if (usage) {
    stats.prompt_tokens = usage.prompt_tokens;
    stats.completion_tokens = usage.completion_tokens;
    const cached = usage.prompt_tokens_details?.cached_tokens;
    if (Number.isFinite(cached)) stats.cached_tokens = cached;
    // The first token's time is the TTFT's; the rate is of those after it.
    const seconds = (end - timing.first) / 1000;
    if (timing.first !== null && usage.completion_tokens > 1 && seconds > 0) {
      stats.tokens_per_s = (usage.completion_tokens - 1) / seconds;
    }
  }
  if (timing.finish) stats.finish_reason = timing.finish;
  return stats;
}

async function generate(conv) {
  const message = { role: "assistant", content: "" };
  conv.messages.push(message);
  conv.title = titleFor(conv);
  conv.updated = Date.now();
  save();
  renderList();
  const controller = new AbortController();
  state.streaming = { controller, message };
  setBusy(true);
  renderMessages();
  const timing = { start: performance.now(), first: null, finish: null, usage: null };
  try {
    if (!state.model) await loadModel();
    const body = requestBody(conv);
    await withKey(() => streamChat(body, controller.signal, (chunk) => {
      absorb(message, chunk, timing);
      queueRender();
    }));
  } catch (error) {
    if (error.name === "AbortError") message.stopped = true;
    else message.error = error.message;
  }
  message.stats = figures(timing, performance.now());
  state.streaming = null;
  conv.updated = Date.now();
  save();
  setBusy(false);
  renderMessages();
}

function send(text) {
  const conv = conversation();
  if (!text.trim() || state.streaming) return;
  conv.messages.push({ role: "user", content: text });
  generate(conv);
}

function resend(index, text) {
  const conv = conversation();
  if (state.streaming || !text.trim()) return;
  conv.messages = conv.messages.slice(0, index);
  state.editing = null;
  conv.messages.push({ role: "user", content: text });
  generate(conv);
}

function regenerate() {
  const conv = conversation();
  if (state.streaming || conv.messages.at(-1)?.role !== "assistant") return;
  conv.messages.pop();
  generate(conv);
}

// --- settings ---

function renderSettings() {
  const settings = conversation().settings;
  $("setting-system").value = settings.system;
  for (const field of NUMBER_SETTINGS) {
    $(`setting-${field}`).value = settings[field] === null ? "" : settings[field];
  }
  for (const field of Object.keys(JSON_SETTINGS)) {
    const input = $(`setting-${field}`);
    input.value = settings[field];
    input.setCustomValidity("");
  }
}

function bindSettings() {
  $("setting-system").addEventListener("input", (event) => {
    conversation().settings.system = event.target.value;
    save();
  });
  for (const field of NUMBER_SETTINGS) {
    $(`setting-${field}`).addEventListener("input", (event) => {
      const raw = event.target.value.trim();
      const value = raw === "" ? null : Number(raw);
      if (value === null || Number.isFinite(value)) {
        conversation().settings[field] = value;
        save();
      }
    });
  }
  for (const [field, what] of Object.entries(JSON_SETTINGS)) {
    const input = $(`setting-${field}`);
    input.addEventListener("input", () => {
      const text = input.value;
      let problem = "";
      if (text.trim()) {
        try {
          const parsed = JSON.parse(text);
          const wanted = field === "tools" ? Array.isArray(parsed)
            : parsed !== null && typeof parsed === "object" && !Array.isArray(parsed);
          if (!wanted) problem = `This must be ${what}.`;
        } catch (error) {
          problem = `Not JSON: ${error.message}`;
        }
      }
      input.setCustomValidity(problem);
      $(`${field}-problem`).textContent = problem;
      // Kept only when valid, so that a request never carries a half-typed schema.
      if (!problem) {
        conversation().settings[field] = text;
        save();
      }
    });
  }
  $("settings-button").addEventListener("click", () => {
    $("settings").hidden = !$("settings").hidden;
  });
  $("settings-close").addEventListener("click", () => { $("settings").hidden = true; });
  $("settings-form").addEventListener("submit", (event) => event.preventDefault());
}

// --- export and import ---

function exportAll() {
  const blob = new Blob([exportJson(state.conversations)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `kvflow-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function importFile(file) {
  try {
    const imported = importJson(await file.text());
    for (const item of imported) {
      const at = state.conversations.findIndex((c) => c.id === item.id);
      if (at >= 0) state.conversations[at] = item;
      else state.conversations.push(item);
    }
    save();
    if (imported.length) select(imported[0].id);
    status(`Imported ${imported.length} conversation(s).`);
  } catch (error) {
    status(`Import failed: ${error.message}`);
  }
}

// --- start ---

async function loadModel() {
  const models = await withKey(() => getJson("/v1/models"));
  const card = models.data[0];
  state.model = card.id;
  const context = card.max_model_len ? ` · ${card.max_model_len.toLocaleString()}-token context` : "";
  $("model-info").textContent = `${card.id}${context}`;
  status("");
}

async function waitForModel() {
  for (;;) {
    try {
      await loadModel();
      renderMessages();
      return;
    } catch (error) {
      status(`The server is not ready: ${error.message}`);
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}

function renderAll() {
  renderList();
  renderMessages();
  renderSettings();
}

function init() {
  setupTheme($("theme-button"));
  const stored = currentId();
  if (stored && state.conversations.some((c) => c.id === stored)) state.current = stored;
  else if (state.conversations.length) state.current = state.conversations[0].id;
  else {
    const fresh = newConversation();
    state.conversations.push(fresh);
    state.current = fresh.id;
    save();
  }
  setCurrentId(state.current);
  renderAll();
  bindSettings();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.streaming) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.streaming?.controller.abort());
  $("new-chat").addEventListener("click", startConversation);
  $("menu-button").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("export-button").addEventListener("click", exportAll);
  $("import-input").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) importFile(file);
    event.target.value = "";
  });
  waitForModel();
}

init();
