// The annotation app's only script. It is served from /static because the Content-Security-Policy allows no
// inline script; the pages are rendered on the server and this file only reorders cards and sends labels.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
    body: JSON.stringify(body),
  });
  let data = {};
  try { data = await response.json(); } catch (e) { /* an error page that is not JSON */ }
  if (!response.ok) throw new Error(data.detail || "the server answered " + response.status);
  return data;
}

function isTyping(event) {
  const t = event.target;
  return t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.isContentEditable);
}

function setStatus(text, kind) {
  const status = document.getElementById("status");
  status.textContent = text;  // textContent, never innerHTML: messages may quote what was sent
  status.className = "status " + (kind || "");
}

// Submit once at a time; a failed request can be retried (the server stores a repeated label only once).
function submitter(button, send, nextUrl) {
  let busy = false;
  return async function () {
    if (busy) return;
    busy = true;
    button.disabled = true;
    setStatus("Saving…");
    try {
      await send();
      setStatus("Saved. Loading the next task…", "ok");
      window.location.assign(nextUrl);
    } catch (error) {
      setStatus("Not saved: " + error.message, "err");
      busy = false;
      button.disabled = false;
    }
  };
}

// ---------------------------------------------------------------- sign in
// A link /signin#token=... fills in and sends the form; the fragment never reaches the server, its logs or proxies.
function initSignin() {
  const form = document.getElementById("signin");
  if (!form) return;
  const match = window.location.hash.match(/^#token=([A-Za-z0-9_-]+)$/);
  if (match) {
    history.replaceState(null, "", window.location.pathname);
    form.elements.token.value = match[1];
    form.submit();
  }
}

// ---------------------------------------------------------------- ranking
function initRank() {
  const task = document.getElementById("rank-task");
  if (!task) return;
  const list = document.getElementById("ranking");
  const allBad = document.getElementById("all-bad");
  const button = document.getElementById("submit");
  const cards = () => Array.from(list.children);
  // ties[i]: place i is tied with place i - 1. Ties belong to places, not to responses, so moving a response
  // into a tied place makes it share that tier.
  const ties = cards().map(() => false);

  function render() {
    let tier = 0;
    cards().forEach((card, i) => {
      const tied = i > 0 && ties[i];
      if (!tied) tier += 1;
      card.classList.toggle("tied", tied);
      card.querySelector(".pos").textContent = tier;
      const tie = card.querySelector('[data-act="tie"]');
      tie.setAttribute("aria-pressed", String(tied));
      tie.disabled = i === 0;
      card.querySelector('[data-act="up"]').disabled = i === 0;
      card.querySelector('[data-act="down"]').disabled = i === ties.length - 1;
    });
    list.classList.toggle("all-bad", allBad.checked);
  }

  function move(card, to) {
    const others = cards().filter((c) => c !== card);
    to = Math.max(0, Math.min(others.length, to));
    list.insertBefore(card, others[to] || null);
    render();
    card.focus();
  }

  function tiers() {
    const out = [];
    cards().forEach((card, i) => {
      const id = Number(card.dataset.sample);
      if (i > 0 && ties[i]) out[out.length - 1].push(id);
      else out.push([id]);
    });
    return out;
  }

  const submit = submitter(button, () => postJSON("/api/rank/" + task.dataset.assignment, {
    tiers: tiers(),
    all_bad: allBad.checked,
    rationale: document.getElementById("rationale").value,
  }), "/rank");
  button.addEventListener("click", submit);
  allBad.addEventListener("change", render);

  list.addEventListener("click", (event) => {
    const b = event.target.closest("button[data-act]");
    if (!b) return;
    const card = b.closest(".card");
    const i = cards().indexOf(card);
    if (b.dataset.act === "up") move(card, i - 1);
    else if (b.dataset.act === "down") move(card, i + 1);
    else { ties[i] = !ties[i]; render(); card.focus(); }
  });

  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") { event.preventDefault(); submit(); return; }
    if (isTyping(event) || event.ctrlKey || event.metaKey || event.altKey) return;
    const card = document.activeElement && document.activeElement.closest && document.activeElement.closest(".card");
    const key = event.key.toLowerCase();
    if (key === "x") { allBad.checked = !allBad.checked; render(); return; }
    if (!card) {
      if (["arrowdown", "arrowup", "j", "k"].includes(key)) { event.preventDefault(); cards()[0].focus(); }
      return;
    }
    const i = cards().indexOf(card);
    const up = key === "arrowup" || key === "k";
    const down = key === "arrowdown" || key === "j";
    if ((up || down) && event.shiftKey) { event.preventDefault(); move(card, up ? i - 1 : i + 1); }
    else if (up || down) { event.preventDefault(); const next = cards()[up ? i - 1 : i + 1]; if (next) next.focus(); }
    else if (/^[1-9]$/.test(key) && Number(key) <= ties.length) { event.preventDefault(); move(card, Number(key) - 1); }
    else if ((key === "t" || key === "=") && i > 0) { ties[i] = !ties[i]; render(); }
  });

  // Drag and drop with the mouse: drop above or below the card under the pointer.
  let dragged = null;
  const clearMarks = () => cards().forEach((c) => c.classList.remove("drop-before", "drop-after"));
  const after = (card, event) => event.clientY > card.getBoundingClientRect().top + card.offsetHeight / 2;
  list.addEventListener("dragstart", (event) => {
    dragged = event.target.closest(".card");
    if (!dragged) return;
    dragged.classList.add("dragging");
    event.dataTransfer.effectAllowed = "move";
    event.dataTransfer.setData("text/plain", dragged.dataset.sample);
  });
  list.addEventListener("dragover", (event) => {
    const over = event.target.closest(".card");
    if (!dragged || !over) return;
    event.preventDefault();
    clearMarks();
    if (over !== dragged) over.classList.add(after(over, event) ? "drop-after" : "drop-before");
  });
  list.addEventListener("drop", (event) => {
    const over = event.target.closest(".card");
    if (!dragged || !over) return;
    event.preventDefault();
    if (over !== dragged) {
      const others = cards().filter((c) => c !== dragged);
      move(dragged, others.indexOf(over) + (after(over, event) ? 1 : 0));
    }
  });
  list.addEventListener("dragend", () => { if (dragged) dragged.classList.remove("dragging"); dragged = null; clearMarks(); });

  render();
  cards()[0].focus({ preventScroll: true });
}

// ---------------------------------------------------------------- side by side
function initCompare() {
  const task = document.getElementById("compare-task");
  if (!task) return;
  const button = document.getElementById("submit");
  const choices = Array.from(task.querySelectorAll(".choice"));
  let choice = null;
  function choose(value) {
    choice = value;
    choices.forEach((c) => c.setAttribute("aria-pressed", String(c.dataset.choice === value)));
  }
  const send = () => {
    if (!choice) return Promise.reject(new Error("choose A, B or About the same first"));
    return postJSON("/api/compare/" + task.dataset.assignment, {
      choice: choice,
      rationale: document.getElementById("rationale").value,
    });
  };
  const submit = submitter(button, send, "/compare");
  choices.forEach((c) => c.addEventListener("click", () => choose(c.dataset.choice)));
  button.addEventListener("click", submit);
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") { event.preventDefault(); submit(); return; }
    if (isTyping(event) || event.ctrlKey || event.metaKey || event.altKey) return;
    const value = { a: "A", b: "B", t: "tie" }[event.key.toLowerCase()];
    if (value) choose(value);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initSignin();
  initRank();
  initCompare();
});
