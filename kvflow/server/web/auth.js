// Asking for the server's API key, when a call is refused with 401.
import { HttpError, apiKey, setApiKey } from "./api.js";

let asking = null;

function build() {
  const dialog = document.createElement("dialog");
  dialog.id = "key-dialog";
  const form = document.createElement("form");
  const title = document.createElement("h2");
  title.textContent = "API key";
  const note = document.createElement("p");
  note.textContent = "This server needs an API key. It is kept in this browser only " +
    "and sent with each request as a bearer token.";
  const input = document.createElement("input");
  input.type = "password";
  input.id = "key-input";
  input.autocomplete = "off";
  input.required = true;
  input.setAttribute("aria-label", "API key");
  const button = document.createElement("button");
  button.type = "submit";
  button.className = "primary";
  button.textContent = "Use this key";
  form.append(title, note, input, button);
  dialog.append(form);
  document.body.append(dialog);
  return { dialog, form, input, note };
}

// Resolves once the user has given a key; concurrent callers share one dialog.
export function askForKey(reason) {
  if (asking) return asking;
  const { dialog, form, input, note } = build();
  if (reason) note.textContent = `${reason} ${note.textContent}`;
  asking = new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      setApiKey(input.value.trim());
      dialog.close();
      dialog.remove();
      asking = null;
      resolve();
    });
    dialog.addEventListener("cancel", (event) => event.preventDefault());
  });
  dialog.showModal();
  input.focus();
  return asking;
}

// Runs call(), asking for a key and trying again for as long as the server says 401.
export async function withKey(call) {
  for (;;) {
    try {
      return await call();
    } catch (error) {
      if (!(error instanceof HttpError) || error.status !== 401) throw error;
      await askForKey(apiKey() ? "The key was refused." : "");
    }
  }
}
