// A small code highlighter: one tokenizer, with keywords and comment styles per language.
// It returns DOM nodes (text nodes and classed spans), so code is never parsed as HTML.

const C_LIKE = { line: "//", block: ["/*", "*/"] };
const LANGUAGES = {
  python: {
    line: "#", triple: true,
    keywords: "and as assert async await break class continue def del elif else except " +
      "finally for from global if import in is lambda nonlocal not or pass raise return " +
      "try while with yield match case",
    literals: "True False None self",
  },
  javascript: {
    ...C_LIKE, backtick: true,
    keywords: "async await break case catch class const continue default delete do else " +
      "export extends finally for from function if import in instanceof let new of return " +
      "static super switch this throw try typeof var void while yield",
    literals: "true false null undefined NaN Infinity",
  },
  json: { keywords: "", literals: "true false null" },
  bash: {
    line: "#",
    keywords: "if then else elif fi for while do done case esac in function return " +
      "export local set unset echo cd",
    literals: "true false",
  },
  c: {
    ...C_LIKE,
    keywords: "auto break case char const continue default do double else enum extern " +
      "float for goto if inline int long register return short signed sizeof static " +
      "struct switch typedef union unsigned void volatile while class public private " +
      "protected template typename namespace using new delete virtual override",
    literals: "true false NULL nullptr",
  },
  rust: {
    ...C_LIKE,
    keywords: "as async await break const continue crate dyn else enum extern fn for if " +
      "impl in let loop match mod move mut pub ref return self Self static struct super " +
      "trait type unsafe use where while",
    literals: "true false None Some Ok Err",
  },
  go: {
    ...C_LIKE, backtick: true,
    keywords: "break case chan const continue default defer else fallthrough for func go " +
      "goto if import interface map package range return select struct switch type var",
    literals: "true false nil iota",
  },
  sql: {
    line: "--",
    keywords: "select from where group by order having limit insert into values update " +
      "set delete create table drop alter join left right inner outer on as and or not " +
      "null is in distinct union all",
    literals: "true false",
    caseless: true,
  },
};
const ALIASES = {
  py: "python", python3: "python", js: "javascript", ts: "javascript",
  typescript: "javascript", jsx: "javascript", tsx: "javascript", sh: "bash", shell: "bash",
  zsh: "bash", console: "bash", cpp: "c", "c++": "c", h: "c", hpp: "c", java: "c",
  cs: "c", csharp: "c", rs: "rust", golang: "go",
};
const compiled = new Map();

function language(name) {
  const key = ALIASES[name] || name;
  const spec = LANGUAGES[key];
  if (!spec) return null;
  if (!compiled.has(key)) {
    const words = (text) => new Set(text.split(" ").filter(Boolean));
    compiled.set(key, { ...spec, kw: words(spec.keywords), lit: words(spec.literals) });
  }
  return compiled.get(key);
}

function span(kind, text) {
  const node = document.createElement("span");
  node.className = `tok-${kind}`;
  node.textContent = text;
  return node;
}

// The end of a string literal starting at `start` (its quote), past an escape-aware scan.
function stringEnd(code, start, quote) {
  let i = start + quote.length;
  while (i < code.length) {
    if (code[i] === "\\") i += 2;
    else if (code.startsWith(quote, i)) return i + quote.length;
    else if (code[i] === "\n" && quote.length === 1 && quote !== "`") return i;
    else i += 1;
  }
  return code.length;
}

export function highlight(code, name) {
  const lang = language((name || "").toLowerCase());
  const out = document.createDocumentFragment();
  if (!lang) {
    out.append(code);
    return out;
  }
  let plain = "";
  const push = (kind, text) => {
    if (plain) out.append(plain);
    plain = "";
    out.append(span(kind, text));
  };
  let i = 0;
  while (i < code.length) {
    const c = code[i];
    if (lang.line && code.startsWith(lang.line, i)) {
      const end = code.indexOf("\n", i);
      const stop = end < 0 ? code.length : end;
      push("com", code.slice(i, stop));
      i = stop;
    } else if (lang.block && code.startsWith(lang.block[0], i)) {
      const end = code.indexOf(lang.block[1], i + 2);
      const stop = end < 0 ? code.length : end + lang.block[1].length;
      push("com", code.slice(i, stop));
      i = stop;
    } else if (c === '"' || c === "'" || (c === "`" && lang.backtick)) {
      const quote = lang.triple && code.startsWith(c.repeat(3), i) ? c.repeat(3) : c;
      const stop = stringEnd(code, i, quote);
      push("str", code.slice(i, stop));
      i = stop;
    } else if (/[0-9]/.test(c) && !/[\w$]/.test(code[i - 1] || "")) {
      const match = /^(0x[0-9a-f_]+|[0-9][0-9_]*(\.[0-9_]+)?(e[+-]?[0-9]+)?)/i.exec(code.slice(i));
      push("num", match[0]);
      i += match[0].length;
    } else if (/[A-Za-z_$]/.test(c)) {
      const word = /^[\w$]+/.exec(code.slice(i))[0];
      const key = lang.caseless ? word.toLowerCase() : word;
      if (lang.kw.has(key)) push("kw", word);
      else if (lang.lit.has(key)) push("lit", word);
      else if (code[i + word.length] === "(") push("fn", word);
      else plain += word;
      i += word.length;
    } else {
      plain += c;
      i += 1;
    }
  }
  if (plain) out.append(plain);
  return out;
}
