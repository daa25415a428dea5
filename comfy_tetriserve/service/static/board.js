// The TetriServe board: polls GET /v1/board and draws devices x time on a canvas.
// No scheduling logic here: everything shown comes from the service. The drawing functions are
// also used by the ComfyUI board panel (globalThis.TetriServeBoard), which sets
// globalThis.TETRISERVE_BOARD_EMBED before loading this file.
(() => {
  "use strict";

  const POLL_MS = 1000;

  function token() { return localStorage.getItem("tetriserve.token") || ""; }

  // One colour per job, kept for the page's life: the n-th job seen gets the n-th hue of the golden-angle
  // sequence, so jobs on the board together (seen close together) get far-apart hues, never a hash collision.
  const hues = new Map();
  function colour(jobId) {
    if (!hues.has(jobId)) hues.set(jobId, Math.round((hues.size * 137.508) % 360));
    const n = hues.get(jobId);
    return `hsl(${n}, ${65 - 10 * (Math.floor(hues.size / 24) % 2)}%, 55%)`;
  }

  function deviceLabel(board, g) {
    return (board.device_labels && board.device_labels[String(g)]) || `GPU ${g}`;
  }

  // The time axis fitted to what is there: from the earliest assignment or open job's submission to the
  // latest expected end or deadline (never more than window_s before now, nor window_s after it).
  function timeSpan(board) {
    const now = board.now_at, w = board.window_s;
    let lo = now - 5, hi = now + 2;
    for (const a of board.assignments) {
      lo = Math.min(lo, a.started_at);
      hi = Math.max(hi, a.finished_at ?? a.expected_end_at);
    }
    for (const j of board.jobs) {
      if (!["finished", "failed", "cancelled"].includes(j.status)) lo = Math.min(lo, j.submitted_at);
      for (const t of [j.deadline_at, j.predicted_finish_at, j.ended_at]) if (t !== null && t !== undefined) hi = Math.max(hi, t);
    }
    lo = Math.max(lo, now - w); hi = Math.min(hi, now + w);
    const pad = (hi - lo) * 0.04;
    return [lo - pad, hi + pad];
  }

  // A job's phase from the board (what the node shows, recomputed at every poll: never a stale "finish in")
  function phaseText(j, now) {
    const end = ["finished", "failed", "cancelled"].includes(j.status);
    if (end) {
      if (j.status !== "finished") return j.status;
      const met = j.deadline_at === null ? "" : j.ended_at <= j.deadline_at ? " · deadline met"
        : ` · ${(j.ended_at - j.deadline_at).toFixed(1)} s late`;
      return `done in ${(j.ended_at - j.submitted_at).toFixed(1)} s${met}`;
    }
    const parts = [];
    if (j.status === "running" && j.gpu_ids.length) {
      parts.push(`on ${j.gpu_ids.length} GPU${j.gpu_ids.length > 1 ? "s" : ""} (${j.gpu_ids.join(",")})`);
    } else parts.push(j.steps_done > 0 ? "waiting for GPUs" : "queued");
    parts.push(`step ${j.steps_done}/${j.num_steps}`);
    if (j.predicted_finish_at !== null) parts.push(`finish in ${fmtIn(Math.max(j.predicted_finish_at, now), now)}`);
    if (j.deadline_at !== null) parts.push(`deadline in ${fmtIn(j.deadline_at, now)}`);
    return parts.join(" · ");
  }

  function fmtIn(at, now) {
    if (at === null || at === undefined) return "–";
    const s = at - now;
    return (s >= 0 ? "" : "−") + Math.abs(s).toFixed(1) + " s";
  }

  function draw(board, canvas = document.getElementById("board")) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    canvas.width = width * ratio; canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.clearRect(0, 0, width, height);

    const gpus = board.gpu_ids, now = board.now_at;
    const left = 64, top = 18, right = width - 8, bottom = height - 20;
    const [t0, t1] = timeSpan(board);
    const x = (t) => left + (Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0) * (right - left);
    const lane = (bottom - top) / Math.max(gpus.length, 1);
    const y = (g) => top + gpus.indexOf(g) * lane;
    const jobs = Object.fromEntries(board.jobs.map((j) => [j.job_id, j]));

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#8b96a3";
    for (const g of gpus) {
      ctx.fillText(deviceLabel(board, g), 4, y(g) + lane / 2 + 4);
      ctx.strokeStyle = "#1c222a";
      ctx.strokeRect(left, y(g), right - left, lane);
    }
    const tick = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600].find((d) => (t1 - t0) / d <= 10) || 1200;
    for (let s = Math.ceil((t0 - now) / tick) * tick; s <= t1 - now; s += tick) {
      ctx.fillText(`${s}s`, x(now + s) - 8, height - 6);
    }

    for (const a of board.assignments) {
      const end = a.finished_at ?? Math.max(a.expected_end_at, now);
      const job = jobs[a.job_ids[0]] || {};
      ctx.globalAlpha = a.finished_at === null ? 0.55 : 0.9;
      ctx.fillStyle = colour(a.job_ids[0]);
      const gs = [...a.gpu_ids].sort((p, q) => gpus.indexOf(p) - gpus.indexOf(q));
      for (const g of gs) {
        const x0 = x(a.started_at), x1 = Math.max(x(end), x0 + 1);
        ctx.fillRect(x0, y(g) + 2, x1 - x0, lane - 4);
        if (job.late) { ctx.globalAlpha = 1; ctx.strokeStyle = "#ff4d4d"; ctx.lineWidth = 2;
          ctx.strokeRect(x0, y(g) + 2, x1 - x0, lane - 4); ctx.lineWidth = 1; }
        if (a.error) { ctx.globalAlpha = 1; ctx.fillStyle = "#ff4d4d"; ctx.fillText("✕", x1 - 10, y(g) + lane / 2 + 4);
          ctx.fillStyle = colour(a.job_ids[0]); }
      }
      ctx.globalAlpha = 1;
      if (x(end) - x(a.started_at) > 40) {
        ctx.fillStyle = "#0b0d10";
        ctx.fillText(a.job_ids[0].split("-").pop(), x(a.started_at) + 3, y(gs[0]) + lane / 2 + 4);
      }
    }

    // model loads: their own style (hatched grey, dashed outline, "load MODEL")
    for (const l of board.loads || []) {
      const end = l.finished_at ?? Math.max(l.expected_end_at, now);
      const x0 = x(l.started_at), x1 = Math.max(x(end), x0 + 1);
      for (const g of l.gpu_ids) {
        if (!gpus.includes(g)) continue;
        ctx.fillStyle = "#2a3038"; ctx.fillRect(x0, y(g) + 2, x1 - x0, lane - 4);
        ctx.save(); ctx.beginPath(); ctx.rect(x0, y(g) + 2, x1 - x0, lane - 4); ctx.clip();
        ctx.strokeStyle = l.error ? "#ff4d4d" : "#8b96a3";
        for (let hx = x0 - lane; hx < x1; hx += 6) {
          ctx.beginPath(); ctx.moveTo(hx, y(g) + lane); ctx.lineTo(hx + lane, y(g)); ctx.stroke();
        }
        ctx.restore();
        ctx.setLineDash([3, 3]); ctx.strokeStyle = "#dde3ea"; ctx.strokeRect(x0, y(g) + 2, x1 - x0, lane - 4);
        ctx.setLineDash([]);
        if (x1 - x0 > 50) { ctx.fillStyle = "#dde3ea"; ctx.fillText(`load ${l.model}`, x0 + 3, y(g) + lane / 2 + 4); }
      }
    }

    for (const j of board.jobs) {
      if (j.deadline_at === null || j.deadline_at < t0 || j.deadline_at > t1) continue;
      ctx.fillStyle = j.late ? "#ff4d4d" : colour(j.job_id);
      const dx = x(j.deadline_at);
      ctx.beginPath(); ctx.moveTo(dx - 5, top - 12); ctx.lineTo(dx + 5, top - 12); ctx.lineTo(dx, top - 2); ctx.fill();
      const rows = j.gpu_ids.length ? j.gpu_ids : [];
      ctx.strokeStyle = ctx.fillStyle;
      for (const g of rows) { ctx.beginPath(); ctx.moveTo(dx, y(g)); ctx.lineTo(dx, y(g) + lane); ctx.stroke(); }
    }

    ctx.setLineDash([4, 4]); ctx.strokeStyle = "#dde3ea";
    ctx.beginPath(); ctx.moveTo(x(now), top); ctx.lineTo(x(now), bottom); ctx.stroke();
    ctx.setLineDash([]);
  }

  const COLUMNS = ["job", "tenant", "model", "size", "status", "steps", "on GPUs", "deadline in", "predicted finish in",
    "slack"];

  function table(board, tbody = document.getElementById("jobs")) {
    const rows = board.jobs.slice().reverse().map((j) => {
      const tr = document.createElement("tr");
      if (j.late) tr.className = "late";
      const cells = [
        `<span class="swatch" style="background:${colour(j.job_id)}"></span>${j.job_id}`,
        j.tenant, j.model, `${j.width}×${j.height}${j.batch > 1 ? " ×" + j.batch : ""}`,
        j.status + (j.simulated ? " (sim)" : ""), `${j.steps_done}/${j.num_steps}`,
        j.status === "running" && j.gpu_ids.length ? j.gpu_ids.join(",") : "–", fmtIn(j.deadline_at, board.now_at),
        j.status === "finished" || j.status === "failed" || j.status === "cancelled" ? "–" : fmtIn(j.predicted_finish_at, board.now_at),
        j.slack_s === null ? "best effort" : j.slack_s.toFixed(1) + " s",
      ];
      for (const c of cells) { const td = document.createElement("td"); td.innerHTML = c; tr.appendChild(td); }
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  function summary(board) {
    const sar = board.sar.overall;
    return {
      sar: sar === null ? "–" : `${(100 * sar).toFixed(1)} % (${board.sar.num_met}/${board.sar.num_deadline_jobs})`,
      policy: board.policy,
      busy: `${board.busy_gpu_ids.length}/${board.gpu_ids.length}`,
      open: String(board.jobs.filter((j) => !["finished", "failed", "cancelled"].includes(j.status)).length),
    };
  }

  async function poll() {
    const status = document.getElementById("status");
    try {
      const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
      const resp = await fetch("/v1/board?window_s=60", { headers });
      if (resp.status === 401) { status.textContent = "token required (button on the right)"; status.className = "bad"; return; }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const board = await resp.json();
      const s = summary(board);
      for (const key of ["sar", "policy", "busy", "open"]) document.getElementById(key).textContent = s[key];
      status.textContent = "live"; status.className = "";
      draw(board); table(board);
    } catch (err) {
      status.textContent = `service unreachable (${err.message})`; status.className = "bad";
    }
  }

  globalThis.TetriServeBoard = { draw, table, summary, colour, fmtIn, phaseText, deviceLabel, timeSpan, COLUMNS };

  // The dashboard page; another page (the ComfyUI panel) sets TETRISERVE_BOARD_EMBED and only uses
  // the drawing functions above.
  if (!globalThis.TETRISERVE_BOARD_EMBED) {
    document.getElementById("token").onclick = () => {
      const t = prompt("Bearer token for this service (empty for none):", token());
      if (t !== null) localStorage.setItem("tetriserve.token", t.trim());
      poll();
    };
    poll();
    setInterval(poll, POLL_MS);
  }
})();
