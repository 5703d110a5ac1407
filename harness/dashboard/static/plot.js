// Time-series charts on uPlot (vendored: uPlot.iife.min.js, MIT): lines over host time that
// break where samples stop (no line across a silence), shaded bands (jobs, idle, meter gaps)
// and labelled vertical marks (phase boundaries) whose labels never overlap: bands, phases
// and epochs each have a row of labels above the plot, and a label that would cover the
// previous one on its row is left out (zoom in to see it).
"use strict";

const Plot = (() => {
  const COLORS = ["#1f6fd1", "#d1541f", "#2a9a45", "#8a3ad1", "#c9a000", "#555"];
  const FONT = "11px system-ui, sans-serif";
  const LABEL_GAP_PX = 6;  // the least space between two labels on one row
  const MIN_BREAK_S = 1.0;  // a silence shorter than this never breaks a line
  const BREAK_FACTOR = 5;   // ... else one longer than 5 typical sample intervals does

  function lowerBound(arr, x) {
    let lo = 0, hi = arr.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (arr[mid] < x) lo = mid + 1; else hi = mid; }
    return lo;
  }

  function upperBound(arr, x) {
    let lo = 0, hi = arr.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (arr[mid] <= x) lo = mid + 1; else hi = mid; }
    return lo;
  }

  // Index of the sample nearest to t in a sorted array (or -1 when empty).
  function nearest(arr, t) {
    if (!arr.length) return -1;
    const i = lowerBound(arr, t);
    if (i <= 0) return 0;
    if (i >= arr.length) return arr.length - 1;
    return t - arr[i - 1] <= arr[i] - t ? i - 1 : i;
  }

  // The silence (s) after which a line breaks: 5 typical (median) sample intervals, >= 1 s.
  function breakAfter(t) {
    const n = Math.min(t.length - 1, 2000);
    if (n < 1) return Infinity;
    const d = [];
    for (let i = t.length - n; i < t.length; i++) d.push(t[i] - t[i - 1]);
    d.sort((a, b) => a - b);
    return Math.max(MIN_BREAK_S, BREAK_FACTOR * d[d.length >> 1]);
  }

  // One line as a uPlot table [x, y] with a null inserted in every silence (a break).
  function table(line) {
    const { t, y } = line;
    const limit = breakAfter(t);
    const xs = [], ys = [];
    for (let i = 0; i < t.length; i++) {
      if (i && t[i] - t[i - 1] > limit) { xs.push((t[i] + t[i - 1]) / 2); ys.push(null); }
      xs.push(t[i]);
      ys.push(Number.isFinite(y[i]) ? y[i] : null);
    }
    return [xs, ys];
  }

  function aligned(lines) {
    const tables = lines.map(table);
    if (!tables.length) return [[]];
    return tables.length === 1 ? tables[0] : uPlot.join(tables);
  }

  // Labels left to right on one row, each kept only if it clears the one before.
  function placeLabels(ctx, items, left, right) {
    const kept = [];
    let end = -Infinity;
    for (const item of items.sort((a, b) => a.x - b.x)) {
      const width = ctx.measureText(item.text).width;
      const x = Math.min(Math.max(item.x, left), right - width);
      if (x < end + LABEL_GAP_PX || x < left) continue;
      kept.push({ text: item.text, x, width });
      end = x + width;
    }
    return kept;
  }

  function decorate(u) {
    const el = u.root.parentElement, spec = el._spec;
    if (!spec) return;
    const ctx = u.ctx, dpr = uPlot.pxRatio;
    const { left, top, width, height } = u.bbox;
    const [x0, x1] = [u.scales.x.min, u.scales.x.max];
    const X = (t) => u.valToPos(t, "x", true);
    ctx.save();
    ctx.beginPath(); ctx.rect(left, 0, width, top + height); ctx.clip();
    ctx.font = FONT.replace("11px", `${11 * dpr}px`);
    ctx.textBaseline = "top";
    ctx.textAlign = "left";  // uPlot leaves the y axis' "right" set
    const bandLabels = [], phaseLabels = [], epochLabels = [];  // one row each
    let marks = 0;
    for (const band of spec.bands) {  // under the lines: drawn in the drawClear hook's wake
      const a = X(Math.max(band.t0, x0)), b = X(Math.min(band.t1, x1));
      if (b <= a) continue;
      if (band.label) bandLabels.push({ text: band.label, x: a + 3 * dpr });
    }
    for (const mark of spec.marks) {
      if (mark.t < x0 || mark.t > x1) continue;
      const x = Math.round(X(mark.t)) + 0.5;
      ctx.strokeStyle = mark.strong ? "#223" : "#8790a0";
      ctx.lineWidth = dpr;
      ctx.setLineDash(mark.strong ? [] : [4 * dpr, 3 * dpr]);
      ctx.beginPath(); ctx.moveTo(x, top - 4 * dpr); ctx.lineTo(x, top + height); ctx.stroke();
      ctx.setLineDash([]);
      if (mark.label) (mark.strong ? phaseLabels : epochLabels).push({ text: mark.label, x: x + 2 * dpr });
      marks += 1;
    }
    const rows = [bandLabels, phaseLabels, epochLabels].map((labels) =>
      placeLabels(ctx, labels, left, left + width));
    ctx.fillStyle = "#223";
    rows.forEach((row, r) => row.forEach((l) => ctx.fillText(l.text, l.x, (2 + 13 * r) * dpr)));
    if (spec.cursorT !== undefined && spec.cursorT >= x0 && spec.cursorT <= x1) {
      const x = Math.round(X(spec.cursorT)) + 0.5;
      ctx.strokeStyle = "rgba(0,0,0,0.45)";
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    }
    ctx.restore();
    el._drawn = {
      marks,
      labels: rows.flat().map((l) => l.text),
      boxes: rows.flatMap((row, r) => row.map((l) => [l.x / dpr, (l.x + l.width) / dpr, r])),
    };
  }

  function shadeBands(u) {
    const el = u.root.parentElement, spec = el._spec;
    if (!spec) return;
    const ctx = u.ctx;
    const { top, height } = u.bbox;
    const [x0, x1] = [u.scales.x.min, u.scales.x.max];
    ctx.save();
    for (const band of spec.bands) {
      const a = u.valToPos(Math.max(band.t0, x0), "x", true);
      const b = u.valToPos(Math.min(band.t1, x1), "x", true);
      if (b <= a) continue;
      ctx.fillStyle = band.fill;
      ctx.fillRect(a, top, b - a, height);
    }
    ctx.restore();
  }

  function create(el, spec) {
    const opts = {
      width: Math.max(100, el.clientWidth),
      height: Math.max(80, el.clientHeight - 28),
      padding: [42, 12, 0, 0],  // room above the plot for the three label rows
      scales: {
        x: { time: true, auto: false },
        y: { range: (u, min, max) => {
          if (min === null || max === null) return [0, 1];
          const lo = spec.zeroBased ? Math.min(0, min) : min;
          const hi = max > lo ? max + (max - lo) * 0.08 : lo + 1;
          return [lo, hi];
        } },
      },
      series: [
        { label: "time" },
        ...spec.lines.map((l, k) => ({
          label: l.label, stroke: l.color || COLORS[k % COLORS.length], width: 1.25,
          spanGaps: false, points: { show: false },
        })),
      ],
      axes: [
        { label: "time (host clock)", labelSize: 18, font: FONT, labelFont: FONT },
        { label: spec.yLabel, labelSize: 18, font: FONT, labelFont: FONT, size: 54,
          values: (u, vals) => vals.map((v) => spec.yFormat(v)) },
      ],
      legend: { show: true, live: false },
      cursor: { show: false, drag: { x: false, y: false, setScale: false } },
      hooks: { drawClear: [shadeBands], draw: [decorate] },
    };
    el.textContent = "";
    el._u = new uPlot(opts, [[], ...spec.lines.map(() => [])], el);
    el._key = null;
  }

  // spec: {x0, x1, lines: [{label, t, y, color}], bands: [{t0, t1, fill, label}],
  //        marks: [{t, label, strong}], yLabel, yFormat, zeroBased, cursorT}
  // Returns {points, marks, labels, boxes}: what was drawn (for the page's data attributes).
  function draw(el, spec) {
    if (!el._u || el._u.series.length !== spec.lines.length + 1) create(el, spec);
    const u = el._u;
    el._spec = spec;
    const width = Math.max(100, el.clientWidth);
    if (u.width !== width) u.setSize({ width, height: u.height });
    const key = spec.lines.map((l) => `${l.t.length}:${l.t.length ? l.t[l.t.length - 1] : ""}`).join(",");
    u.batch(() => {
      const fresh = key !== el._key;
      if (fresh) { u.setData(aligned(spec.lines), false); el._key = key; }
      const same = u.scales.x.min === spec.x0 && u.scales.x.max === spec.x1;
      if (spec.x1 > spec.x0 && (fresh || !same)) u.setScale("x", { min: spec.x0, max: spec.x1 });
      else u.redraw(false, false);  // bands, marks or the cursor moved
    });
    let points = 0;
    for (const line of spec.lines) points += Math.max(0, upperBound(line.t, spec.x1) - lowerBound(line.t, spec.x0));
    const drawn = el._drawn || { marks: 0, labels: [], boxes: [] };
    return { points, marks: drawn.marks, labels: drawn.labels, boxes: drawn.boxes };
  }

  // The time under a mouse event, or undefined outside the plot area.
  function timeAt(el, event) {
    const u = el._u;
    if (!u) return undefined;
    const rect = u.over.getBoundingClientRect();
    const x = event.clientX - rect.left;
    if (x < 0 || x > rect.width || event.clientY < rect.top || event.clientY > rect.bottom) return undefined;
    return u.posToVal(x, "x");
  }

  // The plot area's width in CSS pixels (for drag-panning).
  function plotWidth(el) { return el._u ? el._u.over.getBoundingClientRect().width : 1; }

  return { draw, timeAt, plotWidth, nearest, lowerBound, breakAfter, COLORS };
})();
