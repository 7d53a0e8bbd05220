// Draw every Mermaid diagram of the page with the book's own copy of Mermaid
// (book/_ext/offline_mermaid.py adds this script and mermaid.min.js to pages that have one).
// Diagrams keep Mermaid's light theme; custom.css puts them on a light panel in dark mode.
document.addEventListener("DOMContentLoaded", () => {
  mermaid.initialize(Object.assign({ theme: "default" }, window.bookMermaidConfig || {}));
  mermaid.run({ querySelector: "pre.mermaid" });
});
