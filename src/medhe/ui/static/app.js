// medhe ui: the page. Plain JavaScript, no library, nothing fetched from the internet.
"use strict";

const state = { server: "", models: [], model: null, scans: [], busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

// The backend answers only this page: every state-changing call carries the token it wrote into index.html.
const PAGE_TOKEN = document.querySelector('meta[name="medhe-page-token"]').content;

async function api(method, path, body, headers) {
  let response;
  if (method !== "GET") headers = { ...(headers || {}), "X-Medhe-Page-Token": PAGE_TOKEN };
  try {
    response = await fetch(path, { method, body, headers });
  } catch (e) {
    throw new Error("medhe ui is no longer running on this computer; restart it and reload this page.");
  }
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((data && data.error) || `medhe ui answered ${response.status}; reload the page.`);
  return data;
}

function human(n) {
  if (n == null) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1048576).toFixed(1)} MB`;
}
function ms(v) { return v == null ? "" : v < 1000 ? `${v.toFixed(0)} ms` : `${(v / 1000).toFixed(1)} s`; }

// -- models --------------------------------------------------------------------------------------------------
async function loadModels(refresh) {
  $("models").replaceChildren(el("p", { class: "muted", text: "Loading the server's models..." }));
  try {
    const data = await api("GET", `/api/models${refresh ? "?refresh=true" : ""}`);
    state.server = data.server;
    state.models = data.models;
    $("server-url").textContent = data.server;
    if (!state.models.some((m) => m.id === state.model)) state.model = state.models.length ? state.models[0].id : null;
    clearError();
  } catch (e) {
    state.models = [];
    showError(e.message);
  }
  renderModels();
  updateCoverage();
  updateButtons();
}

function renderModels() {
  const box = $("models");
  if (!state.models.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No model available: check the server and press Refresh." }));
    return;
  }
  box.setAttribute("role", "radiogroup");
  box.replaceChildren(...state.models.map((m) => {
    const metrics = Object.entries(m.test_metrics).map(([k, v]) => `${k.toUpperCase()} ${v}`).join(", ");
    const card = el("div", { class: "model" + (m.id === state.model ? " selected" : ""), "data-model": m.id,
                             role: "radio", tabindex: "0", "aria-checked": String(m.id === state.model) },
      el("h3", {}, `${m.name} `, el("small", { text: m.scheme.toUpperCase() })),
      el("dl", {},
        el("dt", { text: "task" }), el("dd", { text: m.task }),
        el("dt", { text: "labels" }), el("dd", { text: m.labels.join(", ") }),
        el("dt", { text: "input" }), el("dd", { text: m.input + (m.dataset ? ` (trained on ${m.dataset})` : "") }),
        el("dt", { text: "test" }), el("dd", { text: metrics || "-" }),
        el("dt", { text: "encryption" }), el("dd", { text: m.scheme_text }),
        ...(m.calibration ? [el("dt", { text: "calibrated" }), el("dd", {
          text: `yes, on ${m.calibration.fitted_on} (n=${m.calibration.n}): calibrated probabilities and prediction sets` })] : [])),
      el("p", { class: "learns", text: m.server_learns }));
    card.addEventListener("click", () => selectModel(m.id));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectModel(m.id); } });
    return card;
  }));
}

function selectedModel() { return state.models.find((m) => m.id === state.model) || null; }

function updateCoverage() {  // the coverage field only for models with a calibration record
  const m = selectedModel();
  $("coverage-box").hidden = !(m && m.calibration);
  if (m && m.calibration && !$("coverage").dataset.touched) $("coverage").value = String(m.calibration.default_coverage);
}

function coverage() {
  const m = selectedModel();
  if (!(m && m.calibration)) return null;
  const c = Number($("coverage").value);
  if (!(c > 0 && c < 1)) throw new Error("The prediction set coverage must lie between 0 and 1 (e.g. 0.9 for 90%).");
  return c;
}

async function selectModel(id) {
  if (id === state.model || state.busy) return;
  state.model = id;
  renderModels();
  updateCoverage();
  for (const scan of state.scans) {  // the preview and the checks depend on the model
    scan.job = null;
    try { scan.view = await api("GET", `/api/scans/${scan.id}?model=${encodeURIComponent(id)}`); }
    catch (e) { showError(e.message); }
  }
  renderScans();
  updateButtons();
}

// -- scans ---------------------------------------------------------------------------------------------------
async function addFiles(files) {
  if (!state.model) { showError("No model is selected: the server's model list could not be loaded; press Refresh."); return; }
  for (const file of files) {
    try {
      const view = await api("POST", `/api/scans?model=${encodeURIComponent(state.model)}`, file,
                             { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) });
      state.scans.push({ id: view.id, name: view.name, view, job: null });
      clearError();
    } catch (e) {
      showError(e.message);
    }
    renderScans();
  }
  updateButtons();
}

// -- the PACS (medhe ui --pacs) ------------------------------------------------------------------------------
async function loadPacs() {
  try {
    const info = await api("GET", "/api/pacs");
    $("pacs").hidden = !info.enabled;
    if (info.enabled) $("pacs-url").textContent = info.url;
  } catch (e) { /* the page works with files alone */ }
}

function pacsDate(d) { return /^\d{8}$/.test(d || "") ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : (d || "-"); }

async function searchPacs(event) {
  event.preventDefault();
  const q = {};  // a POST body, not a query string: the query of a URL ends up in access logs
  for (const [key, id] of [["patient", "pacs-patient"], ["date", "pacs-date"], ["accession", "pacs-accession"]]) {
    const v = $(id).value.trim();
    if (v) q[key] = v;
  }
  const note = $("pacs-note");
  note.hidden = false;
  note.textContent = "Searching the PACS...";
  $("pacs-studies").hidden = true;
  try {
    const data = await api("POST", "/api/pacs/search", JSON.stringify(q), { "Content-Type": "application/json" });
    const rows = data.studies.map((st) => {
      const add = el("button", { class: "small", "data-ref": st.ref, text: "Add" });
      add.addEventListener("click", () => openStudy(st.ref, add));
      return el("tr", { "data-ref": st.ref },
        el("td", {}, el("code", { text: st.ref })), el("td", { text: pacsDate(st.date) }),
        el("td", { text: st.modalities.join("/") || "-" }), el("td", { text: st.images == null ? "?" : String(st.images) }),
        el("td", { text: st.reported ? "reported" : "-" }), el("td", {}, add));
    });
    $("pacs-studies").querySelector("tbody").replaceChildren(...rows);
    $("pacs-studies").hidden = !rows.length;
    note.textContent = rows.length ? (data.more ? `The newest ${rows.length} chest X-ray studies; narrow the search for others.` : "")
                                   : "No chest X-ray (CR/DX) study matches.";
    note.hidden = !note.textContent;
    clearError();
  } catch (e) {
    note.hidden = true;
    showError(e.message);
  }
}

async function openStudy(ref, button) {
  if (!state.model) { showError("No model is selected: the server's model list could not be loaded; press Refresh."); return; }
  button.disabled = true;
  try {
    const data = await api("POST", "/api/pacs/scans", JSON.stringify({ study: ref, model: state.model }),
                           { "Content-Type": "application/json" });
    for (const view of data.scans) state.scans.push({ id: view.id, name: view.name, view, job: null });
    clearError();
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
  }
  renderScans();
  updateButtons();
}

function renderSteps(job) {
  if (!job) return el("p", { class: "muted", text: "Not diagnosed yet." });
  const list = el("ul", { class: "steps" }, ...job.steps.map((s) =>
    el("li", { class: s.state, "data-step": s.id },
      el("span", { class: "icon" }), el("span", { text: s.title }),
      el("span", { class: "n", text: human(s.bytes) }),
      el("span", { class: "n", text: s.state === "reused" ? "cached" : ms(s.ms) }))));
  const totals = el("div", { class: "totals", text: `sent ${human(job.sent)}, received ${human(job.received)}` });
  return el("div", {}, list, totals);
}

function renderResult(scan) {
  const job = scan.job;
  if (!job) return el("div", {});
  if (job.state === "failed") return el("div", { class: "result" }, el("p", { class: "failure", text: job.error }));
  if (job.state !== "done") return el("div", { class: "result muted", text: "Working..." });
  const r = job.result;
  const multi = r.task === "multi-label";
  const headline = multi ? (r.positive.length ? r.positive.join(", ") : "no finding") : r.label;
  const cal = r.calibrated_probabilities || null;
  const bars = Object.entries(r.probabilities).map(([label, p]) => {
    const positive = multi ? r.positive.includes(label) : label === r.label;
    return el("div", { class: "bar" + (positive ? " positive" : "") + (cal ? " calibrated" : ""), "data-label": label,
                       "data-p": String(p), ...(cal ? { "data-calibrated": String(cal[label]) } : {}) },
      el("span", { text: label }),
      el("span", { class: "track" }, el("span", { class: "fill", style: `width:${(100 * p).toFixed(1)}%;display:block` }),
         el("span", { class: "thr", title: `threshold ${r.threshold}` })),
      el("span", { class: "n", text: p.toFixed(3) }),
      cal ? el("span", { class: "cal", title: "calibrated probability", text: `cal. ${cal[label].toFixed(3)}` }) : null);
  });
  let pset = null;
  if (cal) {  // the conformal prediction set: one label is a diagnosis, anything else is said to be uncertain
    const pct = `${+(100 * r.coverage).toFixed(1)}%`;
    const unsure = r.prediction_set_text.includes("uncertain");
    pset = el("p", { class: "pset" + (unsure ? " uncertain" : ""), "data-set": r.prediction_set_text },
      `Prediction set (${pct} coverage): ${r.prediction_set_text}`);
  }
  const unreliable = r.unreliable ? el("p", { class: "unreliable", role: "alert",
    text: "Unreliable: this scan looks unlike the model's training data (" + r.warnings.join("; ") +
          "). It was diagnosed only because \"Diagnose unusual scans anyway\" was ticked." }) : null;
  return el("div", { class: "result" + (r.unreliable ? " is-unreliable" : ""), "data-label": r.label,
                     "data-unreliable": String(Boolean(r.unreliable)) },
    unreliable,
    el("h4", { text: headline + (r.unreliable ? " (unreliable)" : "") }),
    pset,
    ...bars,
    el("p", { class: "rule", text: `Decision: ${r.decision} (dashed line: threshold ${r.threshold}). ` +
      `Server evaluation ${ms(r.eval_ms)} on the ciphertext.` }),
    el("div", { class: "saw" }, el("img", { src: r.server_saw, alt: "ciphertext bytes" }),
      el("span", { text: `What the server saw: ${human(r.ciphertext_bytes)} of ciphertext (bytes drawn as grey levels), ` +
        `and it sent back ${human(r.result_bytes)} that only this computer can decrypt.` })));
}

function renderScans() {
  $("scans").replaceChildren(...state.scans.map((scan) => {
    const v = scan.view;
    const st = v.stats;
    const info = el("div", {},
      el("img", { class: "preview", src: v.preview, alt: `${scan.name} as the model sees it` }),
      el("div", { class: "meta", text: "as the model sees it" }));
    const left = el("div", {},
      el("div", { class: "name", text: scan.name }),
      el("div", { class: "meta", text: `${st.width}x${st.height}, ${st.channels === 1 ? "greyscale" : "colour"}, ` +
        `mean ${st.mean.toFixed(2)}, contrast ${st.std.toFixed(2)}` }),
      ...v.warnings.map((w) => el("div", { class: "warn", text: "Check: " + w })),
      renderSteps(scan.job));
    return el("div", { class: "scan", "data-scan": scan.id, "data-state": scan.job ? scan.job.state : "new" },
      info, left, renderResult(scan));
  }));
}

function updateButtons() {
  $("diagnose").disabled = state.busy || !state.model || !state.scans.some((s) => !s.job || s.job.state === "failed");
  const anyDone = results().length > 0;
  $("export-csv").disabled = !anyDone;
  $("export-json").disabled = !anyDone;
  $("clear").disabled = state.busy;
}

// -- diagnosis -----------------------------------------------------------------------------------------------
async function diagnose() {
  state.busy = true;
  updateButtons();
  clearError();
  try {
    for (const scan of state.scans) {
      if (scan.job && scan.job.state !== "failed") continue;
      try {
        scan.job = await api("POST", "/api/jobs", JSON.stringify({ scan: scan.id, model: state.model, coverage: coverage(),
                                                                   allow_unusual: $("allow-unusual").checked }),
                             { "Content-Type": "application/json" });
      } catch (e) { showError(e.message); continue; }
      renderScans();
      while (scan.job.state === "queued" || scan.job.state === "running") {
        await new Promise((ok) => setTimeout(ok, 150));
        try { scan.job = await api("GET", `/api/jobs/${scan.job.id}`); }
        catch (e) { showError(e.message); break; }
        renderScans();
      }
      if (scan.job.state === "failed") showError(scan.job.error);
    }
  } finally {
    state.busy = false;
    renderScans();
    updateButtons();
  }
}

// -- export --------------------------------------------------------------------------------------------------
function results() {
  return state.scans.filter((s) => s.job && s.job.state === "done").map((s) => ({
    ...Object.fromEntries(Object.entries(s.job.result).filter(([k]) => k !== "server_saw")),
    bytes_sent: s.job.sent, bytes_received: s.job.received }));
}

function toJSON() { return JSON.stringify({ server: state.server, results: results() }, null, 2); }

function toCSV() {
  const rows = results();
  const labels = [...new Set(rows.flatMap((r) => Object.keys(r.probabilities)))];
  const calibrated = rows.some((r) => r.calibrated_probabilities);  // extra columns only for calibrated models
  const head = ["source", "model", "scheme", "task", "label", "positive", ...labels.map((l) => `p_${l}`),
                ...(calibrated ? [...labels.map((l) => `calibrated_p_${l}`), "prediction_set", "coverage"] : []),
                "threshold", "eval_ms", "bytes_sent", "bytes_received", "unreliable", "warnings"];
  const q = (v) => { const s = v == null ? "" : String(v); return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s; };
  const lines = rows.map((r) => [r.source, r.model, r.scheme, r.task, r.label, r.positive.join(";"),
    ...labels.map((l) => r.probabilities[l]),
    ...(calibrated ? [...labels.map((l) => (r.calibrated_probabilities || {})[l]), r.prediction_set_text, r.coverage] : []),
    r.threshold, r.eval_ms, r.bytes_sent, r.bytes_received, Boolean(r.unreliable),
    (r.warnings || []).join("; ")].map(q).join(","));
  return [head.join(","), ...lines].join("\n") + "\n";
}

function download(name, type, text) {
  const a = el("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

// -- wiring --------------------------------------------------------------------------------------------------
$("files").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); addFiles([...e.dataTransfer.files]); });
$("diagnose").addEventListener("click", diagnose);
$("refresh").addEventListener("click", () => loadModels(true));
$("error-close").addEventListener("click", clearError);
$("coverage").addEventListener("input", () => { $("coverage").dataset.touched = "1"; });
$("clear").addEventListener("click", () => { state.scans = []; renderScans(); updateButtons(); clearError(); });
$("export-csv").addEventListener("click", () => download("medhe-results.csv", "text/csv", toCSV()));
$("export-json").addEventListener("click", () => download("medhe-results.json", "application/json", toJSON()));
$("pacs-search").addEventListener("submit", searchPacs);

window.medhe = { state, results, toCSV, toJSON };
loadModels(false);
loadPacs();
