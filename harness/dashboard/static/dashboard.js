// The run page: follows the server's event stream (rows by id cursor, a summary each second)
// and draws, per device, the power and memory traces with job and phase boundaries.
"use strict";

const runId = decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");
document.getElementById("run-id").textContent = runId;
document.title = "harness " + runId;

const MIB = 1024 * 1024;
const JOB_FILLS = ["rgba(31,111,209,0.07)", "rgba(42,154,69,0.08)"];
const IDLE_FILL = "rgba(120,120,120,0.10)";
const GAP_FILL = "rgba(210,40,40,0.22)";

let state;
// What the page has drawn, for tests and the latency benchmark: the delay (s) between a
// sample's host time and the moment it was first drawn, per drawn sample.
window.dashboard = { latencies: [], drawnSamples: 0, summaries: 0 };

function resetState() {
  state = {
    power: new Map(),   // "device\0meter" -> {device, meter, t, y, v, a, stamped}
    memory: new Map(),  // device -> {t, rss, hwm, tensor, stamped}
    phases: new Map(),  // device -> [{job_id, kind, idx, t0, t1}]
    marks: new Map(),   // device -> [{job_id, epoch, t}]
    gaps: new Map(),    // device -> [{meter, t0, t1, reason}]
    summary: null,
    view: { mode: "all", span: 60, x0: 0, x1: 0 },
    cursorT: undefined,
    dirty: true,
  };
  document.getElementById("devices").textContent = "";
  document.querySelector("#fleet tbody").textContent = "";
}
resetState();

function insertSorted(arrays, t, values) {
  const ts = arrays[0];
  let i = ts.length;
  if (i && t < ts[i - 1]) i = Plot.lowerBound(ts, t);
  if (i === ts.length) arrays.forEach((arr, k) => arr.push(k === 0 ? t : values[k - 1]));
  else arrays.forEach((arr, k) => arr.splice(i, 0, k === 0 ? t : values[k - 1]));
}

function listFor(map, key) {
  if (!map.has(key)) map.set(key, []);
  return map.get(key);
}

function onRows(rows) {
  for (const [device, meter, ts, ws, vs, as] of rows.power) {  // columns per series
    const key = device + "\0" + meter;
    if (!state.power.has(key)) {
      state.power.set(key, { device, meter, t: [], y: [], v: [], a: [], stamped: 0 });
      deviceView(device);
    }
    const s = state.power.get(key);
    for (let i = 0; i < ts.length; i++) {
      if (!s.t.length || ts[i] >= s.t[s.t.length - 1]) {
        s.t.push(ts[i]); s.y.push(ws[i]); s.v.push(vs[i]); s.a.push(as[i]);
      } else {
        insertSorted([s.t, s.y, s.v, s.a], ts[i], [ws[i], vs[i], as[i]]);
      }
    }
  }
  for (const [device, , t, rss, hwm, tensor] of rows.memory) {
    if (!state.memory.has(device)) {
      state.memory.set(device, { t: [], rss: [], hwm: [], tensor: [] });
      deviceView(device);
    }
    const m = state.memory.get(device);
    insertSorted([m.t, m.rss, m.hwm, m.tensor], t, [rss, hwm, tensor]);
  }
  for (const [device, job_id, kind, idx, t0, t1] of rows.phases) listFor(state.phases, device).push({ job_id, kind, idx, t0, t1 });
  for (const [device, job_id, , epoch, t] of rows.marks) listFor(state.marks, device).push({ job_id, epoch, t });
  for (const [device, meter, t0, t1, reason] of rows.gaps) listFor(state.gaps, device).push({ meter, t0, t1: t1 === null ? Infinity : t1, reason });
  state.dirty = true;
}

function dataRange() {
  let lo = Infinity, hi = -Infinity;
  for (const s of state.power.values()) if (s.t.length) { lo = Math.min(lo, s.t[0]); hi = Math.max(hi, s.t[s.t.length - 1]); }
  for (const m of state.memory.values()) if (m.t.length) { lo = Math.min(lo, m.t[0]); hi = Math.max(hi, m.t[m.t.length - 1]); }
  for (const job of jobs()) if (job.t_start_host_s) { lo = Math.min(lo, job.t_start_host_s); hi = Math.max(hi, job.t_end_host_s || job.t_start_host_s); }
  return isFinite(lo) ? [lo, Math.max(hi, lo + 1)] : [0, 1];
}

function jobs() { return state.summary ? state.summary.jobs : []; }

function currentRange() {
  const v = state.view;
  const [lo, hi] = dataRange();
  if (v.mode === "all") return [lo, hi];
  if (v.mode === "last") return [hi - v.span, hi];
  return [v.x0, v.x1];
}

// ------------------------------------------------------------------ DOM per device

function deviceView(device) {
  let el = document.querySelector(`section.device[data-device="${CSS.escape(device)}"]`);
  if (el) return el;
  el = document.createElement("section");
  el.className = "device";
  el.dataset.device = device;
  el.id = "device-" + device;
  el.innerHTML = `<h2></h2><div class="progress"></div>
    <div class="plot power" data-samples="0" data-marks="0"></div>
    <div class="plot memory" data-samples="0"></div>
    <table class="jobs"><thead><tr><th>job</th><th>method</th><th>model</th><th>status</th>
    <th>epochs</th><th>test accuracy</th><th>energy</th></tr></thead><tbody></tbody></table>`;
  el.querySelector("h2").textContent = device;
  for (const plot of el.querySelectorAll(".plot")) attachInteraction(plot, device);
  const all = [...document.querySelectorAll("section.device")].map((s) => s.dataset.device);
  all.push(device); all.sort();
  const next = all[all.indexOf(device) + 1];
  const container = document.getElementById("devices");
  container.insertBefore(el, next ? container.querySelector(`section.device[data-device="${CSS.escape(next)}"]`) : null);
  return el;
}

function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

// A figure as the report prints it: value [95 % interval], and its status when not ok.
function energyText(figures) {
  if (!figures || !figures.length) return "–";
  return figures.map((f) => {
    if (f.status === "withheld") return `withheld (${f.meter})`;
    const value = `${f.energy_j.toFixed(2)} J [${f.energy_lo_j.toFixed(2)}, ${f.energy_hi_j.toFixed(2)}]`;
    const flag = f.status === "low_confidence" ? " low-confidence" : "";
    const kind = f.meter_kind === "modeled" ? " modeled" : "";
    return `${value}${kind}${flag}${f.so_far ? " so far" : ""} (${f.meter})`;
  }).join(", ");
}

function energyTitle(figures) {
  return (figures || []).map((f) => `${f.meter} (${f.meter_kind}), ${f.phase} window: ${f.energy_j === null ? "withheld" : f.energy_j + " J"} over ${f.duration_s.toFixed(2)} s (${f.covered_s.toFixed(2)} s with samples), ${f.samples} samples, ${f.status}${f.reason ? "; " + f.reason : ""}`).join("\n");
}

function cell(row, text, cls, title) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  if (title) td.title = title;
  return td;
}

function onSummary(summary) {
  state.summary = summary;
  window.dashboard.summaries += 1;
  const badge = document.getElementById("liveness");
  badge.textContent = summary.finished ? "finished" : "live";
  badge.className = "badge " + (summary.finished ? "finished" : "live");
  document.getElementById("empty").hidden = summary.devices.length > 0;
  const stats = new Map();
  for (const s of summary.meter_stats) listFor(stats, s.device).push(s);
  const tbody = document.querySelector("#fleet tbody");
  tbody.textContent = "";
  for (const d of summary.devices) {
    const p = d.progress;
    const current = summary.jobs.find((j) => j.job_id === p.job_id) || summary.jobs.filter((j) => j.device === d.name && j.t_start_host_s).pop();
    const row = tbody.insertRow();
    row.dataset.device = d.name;
    const link = document.createElement("a");
    link.href = "#device-" + d.name; link.textContent = d.name;
    row.insertCell().appendChild(link);
    cell(row, d.category, "status status-" + d.category, `store status: ${d.status}${d.reason ? " — " + d.reason : ""}`);
    cell(row, current ? current.job_id : "–");
    cell(row, fmt(p.epoch, 0), "num");
    cell(row, fmt(p.step, 0), "num");
    cell(row, fmt(p.loss, 4), "num");
    cell(row, p.train_accuracy === null ? "–" : `${fmt(p.train_accuracy, 3)} / ${fmt(p.test_accuracy, 3)}`, "num");
    const meters = stats.get(d.name) || [];
    cell(row, meters.map((m) => m.meter).join(", ") || "none");
    cell(row, meters.map((m) => m.achieved_hz === null ? "–" : `${m.achieved_hz.toFixed(2)} Hz`).join(", ") || "–", "num rate");
    cell(row, meters.map((m) => m.rejected_records).join(", ") || "–", "num");
    cell(row, meters.map((m) => m.gaps).join(", ") || "–", "num gaps");
    cell(row, current ? energyText(current.energy) : "–", "num energy", current ? energyTitle(current.energy) : "");
    // the device's own section: progress line and its jobs with energy so far
    const section = deviceView(d.name);
    section.querySelector("h2").innerHTML = "";
    section.querySelector("h2").append(d.name + " ", Object.assign(document.createElement("span"), { className: "status status-" + d.category, textContent: d.category }));
    section.querySelector(".progress").textContent = current
      ? `${current.method || current.kind} · ${current.model || "–"} · ${current.dataset || "–"} — epoch ${fmt(p.epoch, 0)} of ${current.epochs ?? "–"}, step ${fmt(p.step, 0)}, loss ${fmt(p.loss, 4)}, accuracy train ${fmt(p.train_accuracy, 3)} test ${fmt(p.test_accuracy, 3)}` +
        meters.map((m) => ` — meter ${m.meter}: ${m.samples} samples at ${fmt(m.achieved_hz, 2)} Hz, ${m.rejected_records} rejected, ${m.gaps} gaps`).join("")
      : "no job started";
    const jb = section.querySelector("table.jobs tbody");
    jb.textContent = "";
    for (const j of summary.jobs.filter((job) => job.device === d.name)) {
      const r = jb.insertRow();
      r.dataset.job = j.job_id;
      cell(r, j.job_id); cell(r, j.method || j.kind); cell(r, j.model || "–"); cell(r, j.status);
      cell(r, j.result ? String(j.result.epochs ?? "–") : "–", "num");
      cell(r, j.result && j.result.test_accuracy !== null ? j.result.test_accuracy.toFixed(4) : "–", "num");
      cell(r, energyText(j.energy), "num energy", energyTitle(j.energy));
    }
  }
  state.dirty = true;
}

// ------------------------------------------------------------------ drawing

function bandsFor(device, x1) {
  const bands = [];
  const deviceJobs = jobs().filter((j) => j.device === device && j.t_start_host_s);
  deviceJobs.forEach((j, k) => {
    const label = j.kind === "idle" ? "idle" : `${j.method} · ${j.model || "?"}`;
    bands.push({ t0: j.t_start_host_s, t1: j.t_end_host_s || x1, fill: j.kind === "idle" ? IDLE_FILL : JOB_FILLS[k % 2], label });
  });
  for (const g of state.gaps.get(device) || []) bands.push({ t0: g.t0, t1: Math.min(g.t1, x1), fill: GAP_FILL, label: "gap" });
  return bands;
}

function marksFor(device) {
  const marks = [];
  const epochsSeen = new Set();
  for (const p of state.phases.get(device) || []) {
    if (p.kind === "epoch") {
      epochsSeen.add(p.job_id + "\0" + p.idx);
      marks.push({ t: p.t0, label: `epoch ${p.idx}` });
      marks.push({ t: p.t1 });
    } else {
      marks.push({ t: p.t0, label: p.kind === "job" ? "job start" : p.kind, strong: true });
      marks.push({ t: p.t1, label: p.kind === "job" ? "job end" : `${p.kind} end`, strong: true });
    }
  }
  for (const m of state.marks.get(device) || []) {
    if (!epochsSeen.has(m.job_id + "\0" + m.epoch)) marks.push({ t: m.t, label: `epoch ${m.epoch}` });
  }
  return marks;
}

function render() {
  if (!state.dirty) return;
  state.dirty = false;
  const [x0, x1] = currentRange();
  const now = Date.now() / 1000;
  let total = 0;
  for (const section of document.querySelectorAll("section.device")) {
    const device = section.dataset.device;
    const series = [...state.power.values()].filter((s) => s.device === device);
    const bands = bandsFor(device, x1), marks = marksFor(device);
    const power = section.querySelector(".plot.power");
    const drawn = Plot.draw(power, {
      x0, x1, bands, marks, cursorT: state.cursorT, zeroBased: true, yLabel: "power (W)",
      yFormat: (y) => y.toFixed(2),
      lines: series.map((s, k) => ({ label: `${s.meter} (W)`, t: s.t, y: s.y, color: Plot.COLORS[k % Plot.COLORS.length] })),
    });
    power.dataset.samples = drawn.points;
    power.dataset.marks = drawn.marks;
    power.dataset.labels = drawn.labels.join("|");
    power.dataset.boxes = JSON.stringify(drawn.boxes);
    total += drawn.points;
    for (const s of series) {  // stamp samples drawn for the first time
      for (let i = s.stamped; i < s.t.length; i++) {
        if (s.t[i] >= x0 && s.t[i] <= x1) window.dashboard.latencies.push(now - s.t[i]);
      }
      s.stamped = s.t.length;
    }
    const m = state.memory.get(device) || { t: [], rss: [], hwm: [], mib: null };
    const memory = section.querySelector(".plot.memory");
    if (!m.mib || m.mib.n !== m.t.length) {  // MiB columns, recomputed only when samples came
      m.mib = { n: m.t.length, rss: m.rss.map((b) => (b ?? NaN) / MIB), hwm: m.hwm.map((b) => (b ?? NaN) / MIB) };
    }
    const mem = Plot.draw(memory, {
      x0, x1, bands, marks: marks.filter((k) => k.strong), cursorT: state.cursorT, zeroBased: true,
      yLabel: "memory (MiB)", yFormat: (y) => y.toFixed(0),
      lines: [{ label: "RSS (MiB)", t: m.t, y: m.mib.rss, color: "#1f6fd1" },
              { label: "peak RSS (MiB)", t: m.t, y: m.mib.hwm, color: "#d1541f" }],
    });
    memory.dataset.samples = mem.points;
  }
  window.dashboard.drawnSamples = total;
  if (window.dashboard.latencies.length > 200000) window.dashboard.latencies.splice(0, 100000);
  const note = document.getElementById("view-note");
  note.textContent = state.view.mode === "manual" ? "zoomed (double-click: whole run)" : state.view.mode === "last" ? "following the last 60 s" : "";
}

function frame() { render(); requestAnimationFrame(frame); }
requestAnimationFrame(frame);
window.addEventListener("resize", () => { state.dirty = true; });

// ------------------------------------------------------------------ zoom, pan, hover

// A stored value without binary floating-point noise (5.1000000000000005 -> 5.1).
function exact(x) { return x === null ? "–" : String(+x.toPrecision(12)); }

function tooltipText(device, t) {
  const lines = [`${device}  ${new Date(t * 1000).toISOString().replace("T", " ").replace("Z", " UTC")}`];
  for (const s of state.power.values()) {
    if (s.device !== device) continue;
    const i = Plot.nearest(s.t, t);
    if (i < 0) continue;
    let text = `${s.meter}: ${exact(s.y[i])} W at ${new Date(s.t[i] * 1000).toISOString().slice(11, 23)}`;
    if (s.v[i] !== null) text += `, ${exact(s.v[i])} V`;
    if (s.a[i] !== null) text += `, ${exact(s.a[i])} A`;
    lines.push(text);
  }
  const m = state.memory.get(device);
  if (m && m.t.length) {
    const i = Plot.nearest(m.t, t);
    lines.push(`RSS ${m.rss[i]} B (${(m.rss[i] / MIB).toFixed(2)} MiB), peak ${m.hwm[i]} B`);
  }
  for (const j of jobs()) {
    if (j.device === device && j.t_start_host_s <= t && (!j.t_end_host_s || t <= j.t_end_host_s)) {
      lines.push(`job ${j.job_id} (${j.method || j.kind} · ${j.model || "–"}, ${j.status})`);
    }
  }
  for (const p of state.phases.get(device) || []) {
    if (p.kind === "epoch" && p.t0 <= t && t <= p.t1) lines.push(`epoch ${p.idx}: ${(p.t1 - p.t0).toFixed(2)} s`);
  }
  for (const g of state.gaps.get(device) || []) {
    if (g.t0 <= t && t <= g.t1) lines.push(`meter gap (${g.meter}): ${g.reason || ""}`);
  }
  return lines.join("\n");
}

function attachInteraction(plot, device) {
  const tip = document.getElementById("tooltip");
  let drag = null;
  plot.addEventListener("wheel", (event) => {
    const t = Plot.timeAt(plot, event);
    if (t === undefined) return;
    event.preventDefault();
    const [x0, x1] = currentRange();
    const k = event.deltaY > 0 ? 1.25 : 0.8;
    state.view = { ...state.view, mode: "manual", x0: t - (t - x0) * k, x1: t + (x1 - t) * k };
    state.dirty = true;
  }, { passive: false });
  plot.addEventListener("mousedown", (event) => {
    const [x0, x1] = currentRange();
    drag = { x: event.clientX, x0, x1 };
  });
  window.addEventListener("mouseup", () => { drag = null; });
  plot.addEventListener("mousemove", (event) => {
    if (drag) {
      const dt = ((event.clientX - drag.x) / Plot.plotWidth(plot)) * (drag.x1 - drag.x0);
      if (Math.abs(event.clientX - drag.x) > 2) state.view = { ...state.view, mode: "manual", x0: drag.x0 - dt, x1: drag.x1 - dt };
    }
    const t = Plot.timeAt(plot, event);
    state.cursorT = t;
    state.dirty = true;
    if (t === undefined) { tip.hidden = true; return; }
    tip.textContent = tooltipText(device, t);
    tip.hidden = false;
    tip.style.left = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = event.clientY + 14 + "px";
  });
  plot.addEventListener("mouseleave", () => { tip.hidden = true; state.cursorT = undefined; state.dirty = true; });
  plot.addEventListener("dblclick", () => { state.view = { ...state.view, mode: "all" }; state.dirty = true; });
}

document.getElementById("view-all").onclick = () => { state.view = { ...state.view, mode: "all" }; state.dirty = true; };
document.getElementById("view-last").onclick = () => { state.view = { ...state.view, mode: "last" }; state.dirty = true; };

// ------------------------------------------------------------------ the event stream

function connect() {
  const source = new EventSource(location.pathname.replace(/\/?$/, "/") + "stream");
  const problem = document.getElementById("problem");
  source.addEventListener("hello", () => { resetState(); problem.hidden = true; });
  source.addEventListener("problem", (event) => {
    problem.textContent = JSON.parse(event.data).message + " — retrying every 2 s";
    problem.hidden = false;
    document.getElementById("liveness").textContent = "waiting for the store";
  });
  source.addEventListener("rows", (event) => onRows(JSON.parse(event.data)));
  source.addEventListener("summary", (event) => onSummary(JSON.parse(event.data)));
  source.onerror = () => {
    if (problem.hidden) document.getElementById("liveness").textContent = "reconnecting…";
  };
}
connect();
