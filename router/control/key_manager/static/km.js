// The Key Manager's few behaviours; every page works without them (forms post, links link).
"use strict";

function copyText(text, button) {
  const done = () => {
    const old = button.textContent;
    button.textContent = "Copied";
    const status = document.getElementById("copy-status");
    if (status) status.textContent = "Copied to the clipboard.";
    setTimeout(() => { button.textContent = old; }, 2000);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text) && done());
  } else if (fallbackCopy(text)) {
    done();
  }
}

function fallbackCopy(text) {
  // Plain HTTP (no clipboard API): copy through a selected, off-screen text area.
  const t = document.createElement("textarea");
  t.value = text;
  t.setAttribute("readonly", "");
  t.className = "offscreen";
  document.body.appendChild(t);
  t.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
  t.remove();
  return ok;
}

document.addEventListener("click", (e) => {
  const b = e.target.closest("[data-copy]");
  if (!b) return;
  const el = document.getElementById(b.dataset.copy);
  if (el) copyText(el.value !== undefined && el.tagName === "INPUT" ? el.value : el.textContent, b);
});

document.addEventListener("submit", (e) => {
  const msg = e.target.dataset.confirm;
  if (msg && !window.confirm(msg)) e.preventDefault();
});

// Models page: while a deployment loads or drains, reload the tables every 1.5 s.
(function followModels() {
  const live = document.getElementById("models-live");
  if (!live) return;
  const busy = () => live.querySelector('[data-busy="1"]') !== null;
  async function tick() {
    if (busy() && !live.contains(document.activeElement)) {
      try {
        const r = await fetch(live.dataset.refresh, { credentials: "same-origin" });
        if (r.ok) live.innerHTML = await r.text();
      } catch (err) { /* the next tick tries again */ }
    }
    setTimeout(tick, 1500);
  }
  setTimeout(tick, 1500);
})();
