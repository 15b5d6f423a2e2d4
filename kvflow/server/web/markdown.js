// A small Markdown renderer for model output: fenced code, headings, lists, quotes, tables,
// rules, paragraphs; code spans, emphasis, strikethrough and links inline. It builds DOM
// nodes with createElement and text nodes only: any HTML in the text shows as text.
// Unclosed constructs (a fence still streaming) render as far as they go.
import { highlight } from "./highlight.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(\s+|$)(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const ESCAPABLE = "\\`*_{}[]()#+-.!~|>";
const SAFE_LINK = /^(https?:|mailto:)/i;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

const blank = (line) => line.trim() === "";

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    ITEM.test(line) || (line.includes("|") && next !== undefined && TABLE_RULE.test(next) &&
      next.includes("-"));
}

// A code block with its language, a copy button, and highlighted text.
export function codeBlock(code, lang, onCopy) {
  const figure = el("div", "code-block");
  const bar = el("div", "code-bar");
  const label = el("span", "code-lang");
  label.textContent = lang || "text";
  const copy = el("button", "copy-code");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => onCopy(code, copy));
  bar.append(label, copy);
  const pre = el("pre");
  const inner = el("code");
  inner.append(highlight(code, lang));
  pre.append(inner);
  figure.append(bar, pre);
  return figure;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  const cells = [];
  let cell = "";
  for (let i = 0; i < row.length; i++) {
    if (row[i] === "\\" && row[i + 1] === "|") {
      cell += "|";
      i++;
    } else if (row[i] === "|") {
      cells.push(cell.trim());
      cell = "";
    } else cell += row[i];
  }
  cells.push(cell.trim());
  return cells;
}

function table(lines, start, options) {
  const head = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((cell) =>
    cell.endsWith(":") ? (cell.startsWith(":") ? "center" : "right") : cell.startsWith(":") ? "left" : "");
  const wrap = el("div", "table-wrap");
  const node = el("table");
  const row = (cells, tag) => {
    const tr = el("tr");
    head.forEach((_, index) => {
      const cell = el(tag);
      if (aligns[index]) cell.className = `align-${aligns[index]}`;
      inline(cells[index] || "", cell, options);
      tr.append(cell);
    });
    return tr;
  };
  const thead = el("thead");
  thead.append(row(head, "th"));
  const tbody = el("tbody");
  let i = start + 2;
  while (i < lines.length && !blank(lines[i]) && lines[i].includes("|")) {
    tbody.append(row(splitRow(lines[i]), "td"));
    i++;
  }
  node.append(thead, tbody);
  wrap.append(node);
  return { node: wrap, next: i };
}

function list(lines, start, options) {
  const first = ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let i = start;
  let loose = false;
  const items = [];
  while (i < lines.length) {
    const match = ITEM.exec(lines[i]);
    if (!match || /\d/.test(match[2]) !== ordered) break;
    const indent = match[1].length + match[2].length + Math.max(1, Math.min(match[3].length, 4));
    const body = [match[4]];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (blank(line)) {
        const next = lines[i + 1];
        if (next !== undefined && (next.search(/\S/) >= indent)) {
          body.push("");
          loose = true;
          i++;
          continue;
        }
        break;
      }
      const lead = line.search(/\S/);
      if (lead >= indent) body.push(line.slice(indent));
      else if (ITEM.test(line)) break;
      else if (startsBlock(line)) break;
      else body.push(line.trimStart()); // a lazy continuation of the item's paragraph
      i++;
    }
    items.push(body.join("\n"));
    if (blank(lines[i] || "x") && ITEM.test(lines[i + 1] || "")) {
      loose = true;
      i++;
    }
  }
  for (const text of items) {
    const li = el("li");
    const content = renderBlocks(text.split("\n"), options);
    // A tight list's items hold their text directly, not in paragraphs.
    if (!loose && content.firstChild && content.firstChild.tagName === "P") {
      const p = content.firstChild;
      p.replaceWith(...p.childNodes);
    }
    li.append(content);
    node.append(li);
  }
  return { node, next: i };
}

function renderBlocks(lines, options) {
  const out = document.createDocumentFragment();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (blank(line)) {
      i++;
      continue;
    }
    let match;
    if ((match = FENCE.exec(line))) {
      const fence = match[1];
      const body = [];
      i++;
      while (i < lines.length && !new RegExp(`^ {0,3}${fence[0]}{${fence.length},}\\s*$`).test(lines[i])) {
        body.push(lines[i]);
        i++;
      }
      i++; // the closing fence, if any
      out.append(codeBlock(body.join("\n"), match[2], options.onCopy));
    } else if ((match = HEADING.exec(line))) {
      const heading = el(`h${Math.min(match[1].length + 2, 6)}`);
      inline(match[2] || "", heading, options);
      out.append(heading);
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && !blank(lines[i])) {
        const quoted = QUOTE.exec(lines[i]);
        body.push(quoted ? quoted[1] : lines[i]);
        i++;
      }
      const quote = el("blockquote");
      quote.append(renderBlocks(body, options));
      out.append(quote);
    } else if (ITEM.test(line)) {
      const { node, next } = list(lines, i, options);
      out.append(node);
      i = next;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) &&
               lines[i + 1].includes("-")) {
      const { node, next } = table(lines, i, options);
      out.append(node);
      i = next;
    } else {
      const body = [line];
      i++;
      while (i < lines.length && !blank(lines[i]) && !startsBlock(lines[i], lines[i + 1])) {
        body.push(lines[i]);
        i++;
      }
      const paragraph = el("p");
      inline(body.join("\n"), paragraph, options);
      out.append(paragraph);
    }
  }
  return out;
}

// The index of the closing delimiter `delim` for an opener ending at `from`, or -1.
function closing(text, from, delim) {
  let at = text.indexOf(delim, from + 1);
  while (at >= 0) {
    const before = text[at - 1];
    const after = text[at + delim.length] || "";
    const flanks = !/\s/.test(before) &&
      (delim[0] !== "_" || !/[A-Za-z0-9]/.test(after)) &&
      (delim.length > 1 || text[at + 1] !== delim); // a single * is not half of a **
    if (flanks) return at;
    at = text.indexOf(delim, at + 1);
  }
  return -1;
}

function inline(text, parent, options) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(plain);
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && ESCAPABLE.includes(text[i + 1] || "")) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      flush();
      parent.append(el("br"));
      i++;
      continue;
    }
    if (c === "`") {
      const run = /^`+/.exec(text.slice(i))[0];
      const end = text.indexOf(run, i + run.length);
      if (end > 0) {
        flush();
        const code = el("code");
        code.textContent = text.slice(i + run.length, end).replace(/\n/g, " ");
        parent.append(code);
        i = end + run.length;
        continue;
      }
      plain += run;
      i += run.length;
      continue;
    }
    if (c === "*" || c === "_" || c === "~") {
      const delim = text.startsWith(c + c, i) ? c + c : c;
      const opensWord = !/\s/.test(text[i + delim.length] || " ") &&
        (c !== "_" || !/[A-Za-z0-9]/.test(text[i - 1] || ""));
      const end = opensWord && (c !== "~" || delim.length === 2) ? closing(text, i + delim.length - 1, delim) : -1;
      if (end > 0) {
        flush();
        const tag = c === "~" ? "del" : delim.length === 2 ? "strong" : "em";
        const node = el(tag);
        inline(text.slice(i + delim.length, end), node, options);
        parent.append(node);
        i = end + delim.length;
        continue;
      }
      plain += delim;
      i += delim.length;
      continue;
    }
    if (c === "[") {
      const match = /^\[([^\]\n]*)\]\(\s*<?([^\s)>]*)>?(?:\s+"[^"]*")?\s*\)/.exec(text.slice(i));
      if (match) {
        flush();
        if (SAFE_LINK.test(match[2])) {
          const link = el("a");
          link.href = match[2];
          link.target = "_blank";
          link.rel = "noopener noreferrer nofollow";
          inline(match[1], link, options);
          parent.append(link);
        } else {
          // A link to anything but the web or mail (javascript:, data:) stays text.
          plain += match[0];
        }
        i += match[0].length;
        continue;
      }
    }
    plain += c;
    i++;
  }
  flush();
}

export function renderMarkdown(text, options) {
  return renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"), options);
}
