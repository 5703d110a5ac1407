// A small canvas time-series plot: lines over host time, shaded bands (jobs, idle, meter
// gaps) and labelled vertical marks (phase boundaries). Hand-written, no dependencies.
"use strict";

const Plot = (() => {
  const MARGIN = { left: 62, right: 12, top: 30, bottom: 22 };
  const COLORS = ["#1f6fd1", "#d1541f", "#2a9a45", "#8a3ad1", "#c9a000", "#555"];

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

  function clockLabel(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  function niceStep(span, target) {
    const raw = span / Math.max(1, target);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  // spec: {x0, x1, lines: [{label, t, y, color}], bands: [{t0, t1, fill, label}],
  //        marks: [{t, label, strong}], yUnit, yFormat, cursorT}
  // Returns {points, marks, labels}: what was drawn (for the page's data attributes).
  function draw(canvas, spec) {
    const dpr = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth, cssH = canvas.clientHeight;
    if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(cssH * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const w = cssW - MARGIN.left - MARGIN.right, h = cssH - MARGIN.top - MARGIN.bottom;
    const { x0, x1 } = spec;
    const drawn = { points: 0, marks: 0, labels: [] };
    if (!(x1 > x0) || w <= 0 || h <= 0) return drawn;
    const X = (t) => MARGIN.left + ((t - x0) / (x1 - x0)) * w;

    // y range from the visible samples
    let yMin = Infinity, yMax = -Infinity;
    for (const line of spec.lines) {
      const a = Math.max(0, lowerBound(line.t, x0) - 1), b = Math.min(line.t.length, lowerBound(line.t, x1) + 1);
      for (let i = a; i < b; i++) { const y = line.y[i]; if (y < yMin) yMin = y; if (y > yMax) yMax = y; }
    }
    if (!isFinite(yMin)) { yMin = 0; yMax = 1; }
    if (spec.zeroBased) yMin = Math.min(0, yMin);
    if (yMax - yMin < 1e-9) { yMax += 1; yMin = Math.max(spec.zeroBased ? 0 : -Infinity, yMin - 1); }
    yMax += (yMax - yMin) * 0.08;
    const Y = (y) => MARGIN.top + h - ((y - yMin) / (yMax - yMin)) * h;
    canvas._scale = { x0, x1, yMin, yMax, X, Y, w, h, margin: MARGIN };

    ctx.save();
    ctx.beginPath(); ctx.rect(MARGIN.left, 0, w, cssH); ctx.clip();
    ctx.font = "11px system-ui, sans-serif";
    // bands (jobs, idle, gaps) with their labels along the top
    for (const band of spec.bands) {
      const a = X(Math.max(band.t0, x0)), b = X(Math.min(band.t1, x1));
      if (b < MARGIN.left || a > MARGIN.left + w || b <= a) continue;
      ctx.fillStyle = band.fill;
      ctx.fillRect(a, MARGIN.top, b - a, h);
      if (band.label) {
        ctx.fillStyle = "#223";
        const width = ctx.measureText(band.label).width;
        ctx.fillText(band.label, Math.min(Math.max(a, MARGIN.left) + 3, MARGIN.left + w - width - 2), 11);
        drawn.labels.push(band.label);
      }
    }
    // marks: phase boundaries
    for (const mark of spec.marks) {
      if (mark.t < x0 || mark.t > x1) continue;
      const x = Math.round(X(mark.t)) + 0.5;
      ctx.strokeStyle = mark.strong ? "#223" : "#8790a0";
      ctx.setLineDash(mark.strong ? [] : [4, 3]);
      ctx.beginPath(); ctx.moveTo(x, MARGIN.top - 6); ctx.lineTo(x, MARGIN.top + h); ctx.stroke();
      ctx.setLineDash([]);
      if (mark.label) {
        ctx.fillStyle = "#445";
        const width = ctx.measureText(mark.label).width;
        ctx.fillText(mark.label, x + 2 + width > MARGIN.left + w ? x - 2 - width : x + 2, 24);
        drawn.labels.push(mark.label);
      }
      drawn.marks += 1;
    }
    // lines, min/max per pixel column when denser than the canvas
    spec.lines.forEach((line, k) => {
      const a = Math.max(0, lowerBound(line.t, x0) - 1), b = Math.min(line.t.length, lowerBound(line.t, x1) + 1);
      if (b - a < 1) return;
      ctx.strokeStyle = line.color || COLORS[k % COLORS.length];
      ctx.lineWidth = 1.25;
      ctx.beginPath();
      if (b - a > 2 * w) {
        let col = -1, lo = 0, hi = 0, first = true;
        const flush = () => {
          if (col < 0) return;
          if (first) { ctx.moveTo(col, Y(lo)); first = false; } else ctx.lineTo(col, Y(lo));
          ctx.lineTo(col, Y(hi));
        };
        for (let i = a; i < b; i++) {
          const c = Math.round(X(line.t[i])), y = line.y[i];
          if (c !== col) { flush(); col = c; lo = hi = y; } else { if (y < lo) lo = y; if (y > hi) hi = y; }
        }
        flush();
      } else {
        for (let i = a; i < b; i++) {
          const x = X(line.t[i]), y = Y(line.y[i]);
          if (i === a) ctx.moveTo(x, y); else ctx.lineTo(x, y);
        }
      }
      ctx.stroke();
      drawn.points += Math.max(0, upperBound(line.t, x1) - lowerBound(line.t, x0));
    });
    // hover cursor
    if (spec.cursorT !== undefined && spec.cursorT >= x0 && spec.cursorT <= x1) {
      const x = Math.round(X(spec.cursorT)) + 0.5;
      ctx.strokeStyle = "rgba(0,0,0,0.45)";
      ctx.beginPath(); ctx.moveTo(x, MARGIN.top); ctx.lineTo(x, MARGIN.top + h); ctx.stroke();
    }
    ctx.restore();

    // axes
    ctx.strokeStyle = "#99a"; ctx.fillStyle = "#445"; ctx.font = "11px system-ui, sans-serif";
    ctx.strokeRect(MARGIN.left + 0.5, MARGIN.top + 0.5, w, h);
    const yStep = niceStep(yMax - yMin, 4);
    for (let y = Math.ceil(yMin / yStep) * yStep; y <= yMax; y += yStep) {
      const py = Math.round(Y(y)) + 0.5;
      ctx.fillText(spec.yFormat(y), 2, py + 4);
      ctx.beginPath(); ctx.moveTo(MARGIN.left - 3, py); ctx.lineTo(MARGIN.left, py); ctx.stroke();
    }
    ctx.fillText(spec.yUnit, 2, 11);
    const xStep = niceStep(x1 - x0, Math.max(2, Math.floor(w / 90)));
    for (let t = Math.ceil(x0 / xStep) * xStep; t <= x1; t += xStep) {
      const px = Math.round(X(t)) + 0.5;
      ctx.fillText(xStep < 1 ? clockLabel(t) + "." + String(Math.round((t % 1) * 10)) : clockLabel(t), px - 22, cssH - 6);
      ctx.beginPath(); ctx.moveTo(px, MARGIN.top + h); ctx.lineTo(px, MARGIN.top + h + 3); ctx.stroke();
    }
    return drawn;
  }

  // The time under a mouse event, or undefined outside the plot area.
  function timeAt(canvas, event) {
    const s = canvas._scale;
    if (!s) return undefined;
    const rect = canvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    if (x < s.margin.left || x > s.margin.left + s.w) return undefined;
    return s.x0 + ((x - s.margin.left) / s.w) * (s.x1 - s.x0);
  }

  // Index of the sample nearest to t in a sorted array (or -1 when empty).
  function nearest(arr, t) {
    if (!arr.length) return -1;
    const i = lowerBound(arr, t);
    if (i <= 0) return 0;
    if (i >= arr.length) return arr.length - 1;
    return t - arr[i - 1] <= arr[i] - t ? i - 1 : i;
  }

  return { draw, timeAt, nearest, lowerBound, COLORS };
})();
