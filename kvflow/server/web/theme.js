// Light, dark, or the system's choice, kept in localStorage.
const STORAGE = "kvflow.theme";
const ORDER = ["system", "light", "dark"];

function apply(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
}

export function setupTheme(button) {
  let theme = localStorage.getItem(STORAGE) || "system";
  apply(theme);
  const label = () => {
    button.title = `Theme: ${theme} (click to change)`;
    button.setAttribute("aria-label", button.title);
  };
  label();
  button.addEventListener("click", () => {
    theme = ORDER[(ORDER.indexOf(theme) + 1) % ORDER.length];
    localStorage.setItem(STORAGE, theme);
    apply(theme);
    label();
  });
}
