// The rating page: every text from the server is set with textContent (never parsed as HTML).
"use strict";

const CHOICES = { left: "Left", tie: "Tie", right: "Right" };
const KEYS = { a: "left", arrowleft: "left", 1: "left", l: "right", arrowright: "right", 2: "right",
               t: "tie", arrowdown: "tie", 0: "tie" };
const state = { pair: null, questions: [], answers: {}, current: 0, busy: false };
const $ = (id) => document.getElementById(id);

function showError(message) { $("error").textContent = message || ""; }

async function api(path, body) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}),
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = {}; }
  if (!response.ok) { throw new Error(data.message || ("HTTP " + response.status)); }
  return data;
}

function renderQuestions() {
  const list = $("questions");
  list.replaceChildren();
  state.questions.forEach((q, i) => {
    const li = document.createElement("li");
    li.dataset.question = q.key;
    if (i === state.current) { li.classList.add("current"); }
    const text = document.createElement("span");
    text.textContent = q.text;
    li.appendChild(text);
    for (const [choice, label] of Object.entries(CHOICES)) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.dataset.choice = choice;
      if (state.answers[q.key] === choice) { button.classList.add("chosen"); }
      button.addEventListener("click", () => { state.current = i; choose(choice); });
      li.appendChild(button);
    }
    list.appendChild(li);
  });
  $("submit").disabled = !complete();
}

function complete() { return state.questions.every((q) => q.key in state.answers); }

function choose(choice) {
  if (!state.pair || state.busy) { return; }
  state.answers[state.questions[state.current].key] = choice;
  const open = state.questions.findIndex((q) => !(q.key in state.answers));
  state.current = open === -1 ? state.current : open;
  renderQuestions();
}

function showProgress(progress) {
  $("progress").max = progress.total;
  $("progress").value = progress.answered;
  $("progress-text").textContent = progress.answered + " / " + progress.total + " pairs rated";
}

async function load() {
  state.busy = true;
  try {
    const data = await api("/api/next");
    document.title = data.title;
    $("title").textContent = data.title;
    state.questions = data.questions;
    showProgress(data.progress);
    state.pair = data.pair;
    state.answers = {};
    state.current = 0;
    if (!data.pair) {
      $("rating").hidden = true;
      $("done").hidden = false;
      return;
    }
    $("prompt").textContent = data.pair.prompt;
    $("img-left").src = data.pair.left;
    $("img-right").src = data.pair.right;
    $("rating").hidden = false;
    renderQuestions();
    showError("");
  } catch (err) {
    showError(err.message);
  } finally {
    state.busy = false;
  }
}

async function submit() {
  if (!state.pair || state.busy || !complete()) { return; }
  state.busy = true;
  $("submit").disabled = true;
  try {
    await api("/api/vote", { token: state.pair.token, answers: state.answers });
    state.busy = false;
    await load();
  } catch (err) {
    state.busy = false;
    showError(err.message);
    $("submit").disabled = !complete();
  }
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) { return; }
  const key = event.key.toLowerCase();
  if (key in KEYS) { event.preventDefault(); choose(KEYS[key]); }
  else if (key === "backspace" && state.pair) {
    event.preventDefault(); state.current = Math.max(0, state.current - 1); renderQuestions();
  } else if (key === "enter") { event.preventDefault(); submit(); }
});
document.addEventListener("DOMContentLoaded", () => {
  $("submit").addEventListener("click", submit);
  load();
});
