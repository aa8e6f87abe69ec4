// VoiceOps release page: renders api/voices and calls the release actions. Relative URLs only, so the
// page works wherever Airflow mounts it (and inside the Airflow UI's frame).
"use strict";

const REFRESH_MS = 30000;
let data = null;
let busy = false;
const openHistory = new Set();  // voices whose history is unfolded stay so across refreshes

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function showBanner(text, kind, link) {
  const b = $("#banner");
  b.replaceChildren(text);
  if (link) b.append(" ", el("a", { href: link.href, target: "_top" }, link.text));
  b.className = "banner" + (kind ? " " + kind : "");
  b.hidden = false;
}

function errorText(body, status) {
  if (body && typeof body === "object") {
    return [body.detail || `HTTP ${status}`, body.hint].filter(Boolean).join(" ");
  }
  return `HTTP ${status}`;
}

async function call(method, url, payload) {
  const opts = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (payload !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(payload);
  }
  const resp = await fetch(url, opts);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401 || (resp.status === 403 && body && body.login_url)) {
    showBanner("Your Airflow session has ended.", "error", { href: (body && body.login_url) || "../", text: "Log in again" });
    throw Object.assign(new Error("not logged in"), { shown: true });
  }
  if (!resp.ok) throw Object.assign(new Error(errorText(body, resp.status)), { body });
  return body;
}

// --- formatting ---------------------------------------------------------------------------------

function fmt(value, unit, name) {
  if (value === null || value === undefined) return "–";
  if (name === "requests" || unit === "requests") return String(Math.round(value));
  if (unit === "ms") return `${Math.round(value)} ms`;
  if (unit === "x production") return `×${Number(value).toFixed(2)}`;
  if (name === "error_rate" || name === "bad_audio_rate") return `${(value * 100).toFixed(2)}%`;
  return Number(value).toFixed(3).replace(/\.?0+$/, "") || "0";
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function versionCell(label, version, extra, field) {
  return el("div", { class: "alias", "data-field": field },
    el("span", { class: "label" }, label),
    version ? el("span", { class: "value" }, `v${version}`) : el("span", { class: "value none" }, "none"),
    extra || null);
}

// --- rendering ----------------------------------------------------------------------------------

function renderChecks(analysis) {
  if (!analysis) return el("p", { class: "note" }, "No canary analysis recorded yet.");
  const where = [`v${analysis.version}`];
  if (analysis.step !== null && analysis.step !== undefined) where.push(`step ${analysis.step + 1}`);
  if (analysis.weight !== null && analysis.weight !== undefined) where.push(`${analysis.weight}%`);
  const caption = el("caption", {},
    "Latest analysis: ", el("span", { class: `badge ${badgeClass(analysis.outcome)}` }, analysis.outcome || "?"),
    ` (${where.join(", ")}${analysis.ts ? ", " + fmtTime(analysis.ts) : ""})`,
    analysis.detail ? ` — ${analysis.detail}` : "");
  if (!analysis.checks || !analysis.checks.length) {
    return el("table", { class: "checks", "data-field": "analysis" }, caption,
      el("tbody", {}, el("tr", {}, el("td", { class: "note" }, "no checks in this decision"))));
  }
  const rows = analysis.checks.map((c) => el("tr", { "data-check": c.name },
    el("td", {}, c.name),
    el("td", { class: "num" }, fmt(c.value, c.unit, c.name)),
    el("td", { class: "num", title: c.note || "" },
      c.threshold === null || c.threshold === undefined ? (c.note || "–")
        : `${c.op === ">=" ? "≥" : "≤"} ${fmt(c.threshold, c.unit, c.name)}`),
    el("td", {}, el("span", { class: `badge ${badgeClass(c.status)}` }, c.status)),
    el("td", { class: "note" }, c.detail || "")));
  return el("table", { class: "checks", "data-field": "analysis" }, caption,
    el("thead", {}, el("tr", {}, ["Check", "Value", "Threshold", "Status", "Detail"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function badgeClass(s) {
  return { pass: "pass", fail: "fail", inconclusive: "inconclusive", skipped: "skipped", promoted: "pass",
           advanced: "pass", rolled_back: "fail", paused: "warn", extended: "warn", awaiting_approval: "info",
           waiting: "info", blackout: "warn" }[s] || "";
}

function stepText(v) {
  const s = v.step;
  if (!s) return v.canary ? "" : "no canary";
  if (!s.managed) return `set by hand at ${v.canary_weight}% (not driven by canary_promotion)`;
  let t = `step ${s.index} of ${s.of || "?"} (${s.weight}%)`;
  if (s.steps && s.steps.length) t += ` · steps ${s.steps.join(" → ")}%`;
  if (s.started) t += ` · since ${fmtTime(s.started)}`;
  if (s.extensions) t += ` · ${s.extensions} extension(s)`;
  return t;
}

// --- versions, listening, trend, history ----------------------------------------------------------

function gateCell(g) {
  if (!g || g.value === null || g.value === undefined) return el("td", { class: "num" }, "–");
  const limit = g.threshold === null || g.threshold === undefined ? null
    : el("span", { class: "limit" }, `gate ${g.op === ">=" ? "≥" : "≤"} ${fmt(g.threshold)}`);
  return el("td", { class: `num${g.passed === false ? " fail" : ""}`, "data-gate": g.name }, fmt(g.value), limit);
}

function renderVersions(v) {
  const rows = v.version_rows || [];
  if (!rows.length) return el("p", { class: "note", "data-field": "versions" }, "No version registered yet.");
  const names = (rows[0].gates || []).map((g) => g.label);
  const body = rows.map((r) => {
    const byName = Object.fromEntries((r.gates || []).map((g) => [g.label, g]));
    const links = r.links || {};
    return el("tr", { "data-version": r.version, class: r.status === "rejected" ? "rejected" : null },
      el("td", {}, `v${r.version}`),
      el("td", {}, r.aliases.length ? r.aliases.join(", ") : "–"),
      el("td", {}, el("span", { class: `badge ${statusClass(r.status)}`, "data-field": "status" }, r.status)),
      names.map((n) => gateCell(byName[n])),
      el("td", { "data-field": "reasons" }, r.reasons.length ? el("ul", {}, r.reasons.map((x) => el("li", {}, x))) : "–"),
      el("td", { class: "reports" },
        links.eval_report ? el("a", { href: links.eval_report, target: "_blank", rel: "noopener" }, "evaluation") : null,
        links.qc_report ? el("a", { href: links.qc_report, target: "_blank", rel: "noopener" }, "QC") : null,
        links.mlflow_run ? el("a", { href: links.mlflow_run, target: "_blank", rel: "noopener" }, "MLflow run") : null));
  });
  return el("table", { class: "grid", "data-field": "versions" },
    el("thead", {}, el("tr", {}, ["Version", "Aliases", "Status", ...names, "Reasons", "Reports"].map((h) => el("th", {}, h)))),
    el("tbody", {}, body));
}

function statusClass(status) {
  return { rejected: "fail", "rolled back": "fail", regressed: "warn", production: "pass", canary: "info",
           candidate: "info" }[status] || "";
}

function renderListening(v) {
  const l = v.listening || { texts: [], columns: [] };
  if (!l.columns.length) return null;
  if (!l.texts.length) {
    return el("p", { class: "note", "data-field": "listening" },
      "No listening samples: these versions were evaluated before evaluation recorded them.");
  }
  const head = el("tr", {}, el("th", {}, "Sentence"), l.columns.map((c) => el("th", {}, `${c.alias} v${c.version}`)));
  const rows = l.texts.map((text, i) => el("tr", {}, el("td", {}, text), l.columns.map((c) => {
    const s = c.samples[i];
    return el("td", { "data-alias": c.alias },
      s ? el("audio", { controls: true, preload: "none", src: s.url, "data-sample": `${c.alias}-${i}` })
        : el("span", { class: "note" }, "no sample"));
  })));
  return el("table", { class: "grid listen", "data-field": "listening" }, el("thead", {}, head), el("tbody", {}, rows));
}

const TREND_LABELS = { wer: "Whisper WER", speaker_similarity: "similarity", p808_mos: "DNSMOS P.808", rtf: "RTF" };

function sparkline(values) {
  const pts = values.map((y, x) => [x, y]).filter(([, y]) => y !== null && y !== undefined);
  const W = 140, H = 34, P = 3;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!pts.length) return svg;
  const ys = pts.map(([, y]) => y), lo = Math.min(...ys), hi = Math.max(...ys);
  const sx = (x) => P + (values.length > 1 ? (x * (W - 2 * P)) / (values.length - 1) : (W - 2 * P) / 2);
  const sy = (y) => (hi === lo ? H / 2 : H - P - ((y - lo) * (H - 2 * P)) / (hi - lo));
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
  svg.append(line);
  const [lx, ly] = pts[pts.length - 1];
  const dot = document.createElementNS(svg.namespaceURI, "circle");
  dot.setAttribute("cx", sx(lx)); dot.setAttribute("cy", sy(ly)); dot.setAttribute("r", 2.5);
  svg.append(dot);
  return svg;
}

function renderTrend(v) {
  const t = v.trend;
  if (!t) return null;
  if (!t.days.length) {
    return el("p", { class: "note", "data-field": "trend" },
      t.error || `No nightly re-evaluation of production v${t.version} yet (nightly_reevaluation).`);
  }
  const figs = Object.entries(t.metrics).map(([m, values]) => {
    const last = [...values].reverse().find((x) => x !== null && x !== undefined);
    return el("figure", { "data-metric": m }, sparkline(values),
      el("figcaption", {}, `${TREND_LABELS[m] || m} ${fmt(last)}`));
  });
  return el("div", { "data-field": "trend" },
    el("p", { class: "note" }, `Production v${t.version}, last ${t.days.length} night(s): ${t.days[0]} → ${t.days[t.days.length - 1]}` +
      (t.regressions.length ? ` · regressions on ${t.regressions.map((r) => r.day).join(", ")}` : "")),
    el("div", { class: "trend" }, figs));
}

function renderHistory(v) {
  const rows = v.history || [];
  const remember = (e) => (e.target.open ? openHistory.add(v.voice_id) : openHistory.delete(v.voice_id));
  return el("details", { class: "history", "data-field": "history", open: openHistory.has(v.voice_id), ontoggle: remember },
    el("summary", {}, `Release history (${rows.length} latest)`),
    rows.length ? el("table", { class: "grid" },
      el("thead", {}, el("tr", {}, ["Time", "Version", "Step", "Weight", "Outcome", "Detail"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {},
        el("td", {}, fmtTime(r.ts)), el("td", {}, `v${r.version}`), el("td", {}, r.step === null ? "–" : String(r.step + 1)),
        el("td", {}, r.weight === null ? "–" : `${r.weight}%`),
        el("td", {}, el("span", { class: `badge ${badgeClass(r.outcome)}` }, r.outcome)), el("td", { class: "note" }, r.detail)))))
      : el("p", { class: "note" }, "No release decision recorded yet."));
}

function renderVoice(v) {
  const head = el("div", { class: "voice-head" },
    el("h2", {}, v.voice_id), el("span", { class: "model" }, v.model),
    // "idle" over a voice with nothing releasable (say, its only version rejected) would read as fine.
    v.summary && v.release_state === "idle"
      ? el("span", { class: "badge fail", "data-field": "release_state" }, "nothing to release")
      : v.release_state ? el("span", { class: `badge ${v.release_state}`, "data-field": "release_state" }, v.release_state) : null);
  if (v.error) {
    return el("section", { class: "voice", "data-voice": v.voice_id }, head,
      el("p", { class: "problem" }, v.error));
  }
  const weight = v.canary ? v.canary_weight : 0;
  const canaryExtra = v.canary
    ? [el("span", { class: "weight", "data-field": "canary_weight" }, ` at ${v.canary_weight}%`),
       el("div", { class: "weightbar" }, el("span", { style: `width:${weight}%` }))]
    : null;
  const aliases = el("div", { class: "aliases" },
    versionCell("production", v.production, null, "production"),
    versionCell("canary", v.canary, canaryExtra, "canary"),
    versionCell("candidate", v.candidate, null, "candidate"),
    versionCell("previous", v.previous, null, "previous"));

  const facts = el("ul", { class: "facts" });
  facts.append(el("li", { "data-field": "step" }, el("span", { class: "k" }, "Rollout"), stepText(v) || "–"));
  const br = v.breaker || {};
  facts.append(el("li", { "data-field": "breaker" }, el("span", { class: "k" }, "Breaker"),
    br.tripped ? el("span", { class: "badge fail" }, `tripped on v${br.version}`) : el("span", { class: "badge pass" }, "ok"),
    br.tripped && br.reason ? ` ${br.reason}` : ""));
  if (v.rolled_back) {
    facts.append(el("li", { "data-field": "rolled_back" }, el("span", { class: "k" }, "Rolled back"),
      `v${v.rolled_back.version}: ${v.rolled_back.reason || "no reason recorded"}`));
  }
  if (v.approval) {
    facts.append(el("li", { "data-field": "approval" }, el("span", { class: "k" }, "Approval"),
      el("span", { class: "badge info" }, `v${v.approval.version} waits for approval`),
      ` before 100% (since ${fmtTime(v.approval.created_at)}): Approve below, or answer in `,
      el("a", { href: v.approval.url, target: "_blank", rel: "noopener" }, "Airflow's Required Actions")));
  }
  if (v.history_error) facts.append(el("li", { class: "note" }, v.history_error));
  if (v.approvals_error) facts.append(el("li", { class: "note" }, v.approvals_error));

  const can = v.actions || {};
  const write = data && data.can_write;
  const title = write ? null : "your Airflow role may not change releases";
  const button = (action, label, cls) => el("button", {
    type: "button", class: cls || null, "data-action": action, disabled: !(write && can[action]) || busy,
    title: title || (can[action] ? null : `nothing to ${action} in this state`), onclick: () => act(v, action),
  }, label);
  const actions = el("div", { class: "actions" },
    button("promote", v.approval && v.approval.version === v.canary ? "Approve" : "Promote"), button("pause", "Pause"), button("resume", "Resume"),
    button("rollback", "Rollback", "danger"));

  const listening = renderListening(v), trend = renderTrend(v);
  return el("section", { class: "voice", "data-voice": v.voice_id }, head,
    v.summary ? el("p", { class: "problem", "data-field": "summary" }, v.summary) : null,
    aliases, facts, renderChecks(v.analysis), actions,
    el("h3", {}, "Versions"), renderVersions(v),
    listening ? [el("h3", {}, "Listen: the same sentences"), listening] : null,
    trend ? [el("h3", {}, "Nightly trend of production"), trend] : null,
    renderHistory(v));
}

function render() {
  const main = $("#voices");
  if (!data) return;
  $("#meta").textContent = `Registry ${data.registry} · signed in as ${data.user}` +
    `${data.can_write ? "" : " (read only)"} · updated ${new Date(data.generated_at * 1000).toLocaleTimeString()}`;
  if (!data.voices.length) {
    main.replaceChildren(el("p", { class: "empty" }, "No voice is registered yet. Onboard one with the voice_onboarding dag."));
    return;
  }
  main.replaceChildren(...data.voices.map(renderVoice));
}

async function refresh() {
  try {
    data = await call("GET", "api/voices");
    render();
  } catch (e) {
    if (!e.shown) showBanner(`Could not load the releases: ${e.message}`, "error");
  }
}

// --- actions ------------------------------------------------------------------------------------

function question(v, action) {
  const m = v.model;
  switch (action) {
    case "promote": {
      const target = v.canary || v.candidate;
      if (v.approval && v.approval.version === v.canary) {
        return `Approve ${m} version ${target}? canary_promotion takes it to 100% of users for one more window, ` +
          "then makes it production.";
      }
      return `Promote ${m} version ${target} to production?` +
        (v.production ? ` Version ${v.production} becomes previous.` : "");
    }
    case "pause":
      return `Pause the canary (version ${v.canary}) of ${m} at ${v.canary_weight}%? It stops advancing until resumed.`;
    case "resume":
      return `Resume the paused canary (version ${v.canary}) of ${m}?`;
    case "rollback":
      return v.canary
        ? `Roll back the canary version ${v.canary} of ${m}? Its ${v.canary_weight}% of traffic goes back to production` +
          (v.production ? ` version ${v.production}.` : ".")
        : `Roll back production of ${m} from version ${v.production} to version ${v.previous}?`;
    default:
      return `${action} ${m}?`;
  }
}

function modalsBlocked() {
  // A sandboxed frame without allow-modals (how the Airflow UI frames url_route views) makes confirm() and
  // prompt() return at once without asking, so no action could ever be confirmed there.
  try {
    const sb = window.frameElement && window.frameElement.sandbox;
    return Boolean(sb && sb.length && !sb.contains("allow-modals"));
  } catch (e) {
    return false;
  }
}

async function act(v, action) {
  if (busy) return;
  if (modalsBlocked()) {
    showBanner("This frame blocks confirmation dialogs, so actions are disabled here.", "error",
      { href: location.href, text: "Open the release page on its own" });
    return;
  }
  if (!window.confirm(question(v, action))) return;
  const payload = {};
  if (action === "promote" && v.approval && v.approval.version === v.canary) {
    const reason = window.prompt(`Why approve ${v.model} version ${v.canary}? Recorded with your name.`, "");
    if (reason === null) return;
    payload.reason = reason.trim();
  }
  if (action === "rollback") {
    const reason = window.prompt(`Why roll back ${v.model}? The reason is recorded on the version.`, "");
    if (reason === null) return;
    if (!reason.trim()) {
      showBanner("A rollback needs a reason; nothing was changed.", "error");
      return;
    }
    payload.reason = reason.trim();
  }
  busy = true;
  render();
  try {
    const res = await call("POST", `api/voices/${encodeURIComponent(v.voice_id)}/${action}`, payload);
    showBanner(res.message, "ok");
  } catch (e) {
    if (!e.shown) showBanner(e.message, "error");
  } finally {
    busy = false;
    await refresh();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#refresh").addEventListener("click", refresh);
  refresh();
  // No refresh while someone listens: re-rendering would cut the sample off.
  const listening = () => [...document.querySelectorAll("audio")].some((a) => !a.paused);
  setInterval(() => { if (!busy && !listening() && document.visibilityState === "visible") refresh(); }, REFRESH_MS);
});
