// The usage page: GET /v1/usage and three SVG charts (GPU-hours per group per day, SAR per day,
// latency percentiles per day) and a table per group. Everything shown comes from the service.
(() => {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const PAD = { left: 44, right: 8, top: 10, bottom: 22 };

  function colour(key, i) {
    return `hsl(${Math.round((i * 137.508) % 360)}, 60%, 55%)`; // golden-angle hues: neighbours differ
  }

  function el(tag, attrs = {}, text = null) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== null) node.textContent = text;
    return node;
  }

  function frame(svg, days, yMax, yFmt) {
    svg.replaceChildren();
    const w = svg.clientWidth || 600, h = svg.clientHeight || 220;
    const plotW = w - PAD.left - PAD.right, plotH = h - PAD.top - PAD.bottom;
    const band = plotW / Math.max(days.length, 1);
    const x = (i) => PAD.left + i * band;
    const y = (v) => PAD.top + plotH * (1 - v / (yMax || 1));
    for (let k = 0; k <= 4; k++) {
      const v = (yMax * k) / 4;
      svg.append(el("line", { x1: PAD.left, x2: w - PAD.right, y1: y(v), y2: y(v), stroke: "#1c222a" }));
      svg.append(el("text", { x: 2, y: y(v) + 4 }, yFmt(v)));
    }
    const every = Math.ceil(days.length / 10);
    days.forEach((d, i) => {
      if (i % every === 0) svg.append(el("text", { x: x(i) + 2, y: h - 6 }, d.day.slice(5)));
    });
    return { x, y, band };
  }

  function drawGpu(report) {
    const svg = document.getElementById("gpu_chart");
    const keys = report.groups.map((g) => g.key);
    const max = Math.max(0, ...report.days.map((d) => Object.values(d.gpu_hours).reduce((a, b) => a + b, 0)));
    const { x, y, band } = frame(svg, report.days, max * 1.1 || 1, (v) => v.toFixed(v < 10 ? 2 : 0));
    report.days.forEach((d, i) => {
      let base = 0;
      keys.forEach((k, j) => {
        const v = d.gpu_hours[k] || 0;
        if (v <= 0) return;
        const rect = el("rect", { x: x(i) + band * 0.1, width: band * 0.8, y: y(base + v), height: y(base) - y(base + v),
                                  fill: colour(k, j) });
        rect.append(el("title", {}, `${d.day} ${k}: ${v.toFixed(3)} GPU-hours`));
        svg.append(rect);
        base += v;
      });
    });
    document.getElementById("gpu_legend").innerHTML = keys.map((k, j) =>
      `<span><i class="swatch" style="background:${colour(k, j)}"></i>${k}</span>`).join("");
  }

  function line(svg, points, stroke) {
    const pts = points.filter((p) => p[1] !== null && p[1] !== undefined);
    if (!pts.length) return;
    svg.append(el("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none", stroke, "stroke-width": 2 }));
    for (const [px, py] of pts) svg.append(el("circle", { cx: px, cy: py, r: 2.5, fill: stroke }));
  }

  function drawSar(report) {
    const svg = document.getElementById("sar_chart");
    const { x, y, band } = frame(svg, report.days, 1, (v) => v.toFixed(2));
    line(svg, report.days.map((d, i) => [x(i) + band / 2, d.sar === null ? null : y(d.sar)]), "#7ee787");
  }

  function drawLatency(report) {
    const svg = document.getElementById("latency_chart");
    const series = [["p50_s", "#8bb8ff"], ["p90_s", "#f2cc60"], ["p99_s", "#ff7b72"]];
    const max = Math.max(0, ...report.days.flatMap((d) => series.map(([k]) => d.latency[k] || 0)));
    const { x, y, band } = frame(svg, report.days, max * 1.1 || 1, (v) => v.toFixed(v < 10 ? 1 : 0));
    for (const [k, c] of series) {
      line(svg, report.days.map((d, i) => [x(i) + band / 2, d.latency[k] === null ? null : y(d.latency[k])]), c);
    }
    document.getElementById("latency_legend").innerHTML = series.map(([k, c]) =>
      `<span><i class="swatch" style="background:${c}"></i>${k.replace("_s", "")}</span>`).join("");
  }

  const fmt = (v, digits = 2) => (v === null || v === undefined ? "–" : v.toFixed(digits));

  function render(report) {
    document.getElementById("num_jobs").textContent = report.num_jobs;
    document.getElementById("gpu_hours").textContent = fmt(report.gpu_hours);
    document.getElementById("sar").textContent = report.sar === null ? "–" : (report.sar * 100).toFixed(1) + "%";
    for (const n of document.querySelectorAll(".bylabel")) n.textContent = report.by;
    drawGpu(report);
    drawSar(report);
    drawLatency(report);
    document.getElementById("groups").innerHTML = report.groups.map((g) => `<tr><td>${g.key}</td><td>${g.num_jobs}</td>
      <td>${g.num_finished}</td><td>${g.num_failed}</td><td>${g.num_cancelled}</td><td>${g.num_lost}</td>
      <td>${fmt(g.gpu_hours, 3)}</td><td>${g.num_deadline_jobs}</td><td>${g.sar === null ? "–" : (g.sar * 100).toFixed(1) + "%"}</td>
      <td>${fmt(g.latency.p50_s, 1)}</td><td>${fmt(g.latency.p90_s, 1)}</td><td>${fmt(g.latency.p99_s, 1)}</td></tr>`).join("");
    const status = document.getElementById("status");
    status.textContent = report.history ? `${report.days.length} days` : "this service keeps no history (--journal off)";
    status.className = report.history ? "" : "bad";
  }

  async function load() {
    const params = new URLSearchParams(location.search);
    for (const name of ["since", "until", "by"]) {
      const v = document.getElementById(name).value;
      if (v) params.set(name, v); else params.delete(name);
    }
    const token = localStorage.getItem("tetriserve.token") || "";
    const status = document.getElementById("status");
    try {
      const resp = await fetch("/v1/usage?" + params, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
      const body = await resp.json();
      if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
      render(body);
      document.body.dataset.loaded = "true";
    } catch (err) {
      status.textContent = String(err.message || err);
      status.className = "bad";
    }
  }

  const query = new URLSearchParams(location.search);
  for (const name of ["since", "until", "by"]) if (query.get(name)) document.getElementById(name).value = query.get(name);
  document.getElementById("show").addEventListener("click", load);
  load();
})();
