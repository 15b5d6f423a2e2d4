// One chat message as DOM: the user's text as text; the model's answer as Markdown, its
// reasoning in a collapsible block apart from it, its tool calls as such, and the figures
// of its generation under it.
import { codeBlock, renderMarkdown } from "./markdown.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, className) {
  const node = el("button", className, label);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

export async function copyText(text, feedback) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API (a page served over plain http to another host): select and copy.
    const area = el("textarea", "offscreen");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = feedback.textContent;
  feedback.textContent = "Copied";
  setTimeout(() => { feedback.textContent = label; }, 1200);
}

const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

function statsLine(stats) {
  const parts = [];
  if (stats.completion_tokens !== undefined) parts.push(`${stats.completion_tokens} tokens`);
  if (stats.tokens_per_s !== undefined) parts.push(`${number.format(stats.tokens_per_s)} tok/s`);
  if (stats.ttft_ms !== undefined) parts.push(`TTFT ${Math.round(stats.ttft_ms)} ms`);
  if (stats.prompt_tokens !== undefined) parts.push(`${stats.prompt_tokens} prompt tokens`);
  if (stats.cached_tokens !== undefined) parts.push(`${stats.cached_tokens} cached`);
  if (stats.finish_reason) parts.push(`finish: ${stats.finish_reason}`);
  return parts.join(" · ");
}

function toolCall(call) {
  const box = el("div", "tool-call");
  box.append(el("div", "tool-call-name", `Tool call: ${call.name || "(unnamed)"}`));
  let args = call.arguments || "";
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch {
    // arguments still streaming, or not JSON: shown as they are
  }
  box.append(codeBlock(args, "json", copyText));
  return box;
}

function assistantBody(message, streaming) {
  const body = document.createDocumentFragment();
  if (message.reasoning) {
    const details = el("details", "reasoning");
    details.open = streaming && !message.content;
    details.append(el("summary", null, streaming && !message.content ? "Reasoning…" : "Reasoning"));
    const inner = el("div", "reasoning-body");
    inner.append(renderMarkdown(message.reasoning, { onCopy: copyText }));
    details.append(inner);
    body.append(details);
  }
  const content = el("div", "content markdown");
  content.append(renderMarkdown(message.content, { onCopy: copyText }));
  if (streaming) content.append(el("span", "cursor"));
  body.append(content);
  for (const call of message.tool_calls || []) body.append(toolCall(call));
  if (message.stopped) body.append(el("div", "note", "Stopped."));
  if (message.error) body.append(el("div", "error", message.error));
  if (message.stats) body.append(el("div", "stats", statsLine(message.stats)));
  return body;
}

function editor(message, handlers) {
  const form = el("form", "editor");
  const area = el("textarea");
  area.value = message.content;
  area.rows = Math.min(12, message.content.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit message");
  const send = el("button", "primary", "Send");
  send.type = "submit";
  form.append(area, el("div", "actions"));
  form.lastChild.append(send, button("Cancel", handlers.cancelEdit));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    handlers.resend(area.value);
  });
  queueMicrotask(() => area.focus());
  return form;
}

// `handlers`: edit, cancelEdit, resend(text), regenerate; `flags`: streaming (this message
// is being written), busy (some message is), last (the conversation's last), editing.
export function renderMessage(message, handlers, flags) {
  const node = el("article", `message ${message.role}`);
  node.append(el("div", "role", message.role === "user" ? "You" : "Model"));
  if (message.role === "user") {
    if (flags.editing) {
      node.append(editor(message, handlers));
      return node;
    }
    node.append(el("div", "content plain", message.content));
  } else {
    node.append(assistantBody(message, flags.streaming));
  }
  if (flags.streaming) return node;
  const actions = el("div", "actions");
  if (message.role === "user") {
    const edit = button("Edit", handlers.edit, "edit");
    edit.disabled = flags.busy;
    actions.append(edit);
  } else {
    const copy = button("Copy", () => copyText(message.content, copy), "copy");
    actions.append(copy);
    if (flags.last) {
      const again = button("Regenerate", handlers.regenerate, "regenerate");
      again.disabled = flags.busy;
      actions.append(again);
    }
  }
  node.append(actions);
  return node;
}
