// Conversations, kept in this browser's localStorage, and their JSON export and import.

const STORAGE = "kvflow.conversations";
const CURRENT = "kvflow.currentConversation";
const EXPORT_FORMAT = "kvflow-conversations";
const ROLES = new Set(["user", "assistant"]);
const SETTING_FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed", "json_schema",
  "tools"];
const STAT_FIELDS = ["prompt_tokens", "completion_tokens", "cached_tokens", "ttft_ms",
  "tokens_per_s"];

export function newSettings() {
  return { system: "", temperature: null, top_p: null, max_tokens: null, seed: null,
    json_schema: "", tools: "" };
}

export function newConversation() {
  const now = Date.now();
  return { id: crypto.randomUUID(), title: "New chat", created: now, updated: now,
    settings: newSettings(), messages: [] };
}

// A conversation as read from outside (storage or an imported file), checked field by
// field: what is not a string, number or list where one is expected is refused.
function checked(raw) {
  if (!raw || typeof raw !== "object" || !Array.isArray(raw.messages)) {
    throw new Error("a conversation needs a list of messages");
  }
  const settings = newSettings();
  for (const field of SETTING_FIELDS) {
    const value = raw.settings ? raw.settings[field] : undefined;
    const text = typeof settings[field] === "string";
    if (text ? typeof value === "string" : Number.isFinite(value)) settings[field] = value;
  }
  const messages = raw.messages.map((message) => {
    if (!message || !ROLES.has(message.role) || typeof message.content !== "string") {
      throw new Error("each message needs a role (user or assistant) and text content");
    }
    const kept = { role: message.role, content: message.content };
    if (message.role === "assistant") {
      if (typeof message.reasoning === "string") kept.reasoning = message.reasoning;
      if (Array.isArray(message.tool_calls)) {
        kept.tool_calls = message.tool_calls
          .filter((call) => call && typeof call.name === "string")
          .map((call) => ({ name: call.name, arguments: String(call.arguments ?? "") }));
      }
      if (message.stats && typeof message.stats === "object") {
        kept.stats = {};
        for (const field of STAT_FIELDS) {
          if (Number.isFinite(message.stats[field])) kept.stats[field] = message.stats[field];
        }
        if (typeof message.stats.finish_reason === "string") {
          kept.stats.finish_reason = message.stats.finish_reason;
        }
      }
      if (message.stopped === true) kept.stopped = true;
      if (typeof message.error === "string") kept.error = message.error;
    }
    return kept;
  });
  const now = Date.now();
  return {
    id: typeof raw.id === "string" && raw.id ? raw.id : crypto.randomUUID(),
    title: typeof raw.title === "string" && raw.title ? raw.title : "Imported chat",
    created: Number.isFinite(raw.created) ? raw.created : now,
    updated: Number.isFinite(raw.updated) ? raw.updated : now,
    settings,
    messages,
  };
}

export function loadConversations() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORAGE) || "[]");
    return stored.map(checked);
  } catch {
    return [];
  }
}

export function saveConversations(conversations) {
  localStorage.setItem(STORAGE, JSON.stringify(conversations));
}

export function currentId() {
  return localStorage.getItem(CURRENT);
}

export function setCurrentId(id) {
  localStorage.setItem(CURRENT, id);
}

export function exportJson(conversations) {
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, conversations }, null, 1);
}

// The conversations of an exported file; throws with the reason if it is not one.
export function importJson(text) {
  const data = JSON.parse(text);
  if (!data || data.format !== EXPORT_FORMAT || !Array.isArray(data.conversations)) {
    throw new Error("not a kvflow conversations export");
  }
  return data.conversations.map(checked);
}

// A title from the first user message.
export function titleFor(conversation) {
  const first = conversation.messages.find((message) => message.role === "user");
  if (!first) return "New chat";
  const line = first.content.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}
