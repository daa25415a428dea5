// The TetriServe board as a ComfyUI bottom-panel tab: the box's GPUs x time (one colour per
// job, deadline marks, late jobs outlined), the queue with predicted finishes, and SAR.
//
// Everything drawn comes from the scheduler service: the board document through this ComfyUI's
// route /tetriserve/board (a proxy, so the browser stays on its own origin and never sees the
// service's token), and the drawing code is the service dashboard's own board.js, served by the
// route /tetriserve/board.js. Events pushed by the TetriServe Sampler nodes ("tetriserve.job")
// refresh the board at once and list this instance's jobs. No scheduling logic here.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "tetriserve-board";
const WINDOW_S = 30;
const POLL_MS = 1000;
const MAX_RECENT = 8;

const recent = new Map(); // job_id -> last pushed event of this instance's samplers
const mounted = new Set(); // live panel views

function loadBoardLibrary() {
  if (globalThis.TetriServeBoard) return Promise.resolve(globalThis.TetriServeBoard);
  if (!loadBoardLibrary.promise) {
    loadBoardLibrary.promise = new Promise((resolve, reject) => {
      globalThis.TETRISERVE_BOARD_EMBED = true; // board.js: drawing functions only, no page of its own
      const script = document.createElement("script");
      script.src = api.apiURL("/tetriserve/board.js");
      script.onload = () => resolve(globalThis.TetriServeBoard);
      script.onerror = () => {
        loadBoardLibrary.promise = null;
        reject(new Error("the board drawing code did not load"));
      };
      document.head.appendChild(script);
    });
  }
  return loadBoardLibrary.promise;
}

function element(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v);
  }
  el.append(...children);
  return el;
}

const STYLE = `
  .tetriserve-panel { font: 12px/1.4 system-ui, sans-serif; color: #dde3ea; background: #111418;
    height: 100%; display: flex; flex-direction: column; padding: 6px 10px; box-sizing: border-box; overflow: hidden; }
  .tetriserve-panel .jobs { flex: 1 1 0; min-height: 60px; overflow: auto; }
  .tetriserve-panel thead th { position: sticky; top: 0; background: #111418; }
  .tetriserve-panel header { display: flex; gap: 18px; align-items: baseline; margin-bottom: 6px; flex-wrap: wrap; }
  .tetriserve-panel header b { color: #fff; font-size: 13px; }
  .tetriserve-panel .bad { color: #ff7b72; }
  .tetriserve-panel canvas { width: 100%; height: 200px; flex: 0 0 200px; display: block; background: #0b0d10;
    border: 1px solid #2a313a; }
  .tetriserve-panel table { border-collapse: collapse; width: 100%; margin-top: 6px; }
  .tetriserve-panel th, .tetriserve-panel td { text-align: left; padding: 2px 8px; border-bottom: 1px solid #232a33;
    white-space: nowrap; }
  .tetriserve-panel th { color: #8b96a3; font-weight: 500; }
  .tetriserve-panel tr.late td { color: #ff7b72; }
  .tetriserve-panel .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
  .tetriserve-panel .mine { color: #8b96a3; margin-top: 6px; }
`;

function mount(container) {
  container.replaceChildren();
  if (!document.getElementById("tetriserve-panel-style")) {
    document.head.appendChild(element("style", { id: "tetriserve-panel-style" }, STYLE));
  }
  const stat = (id, label) => element("span", {}, `${label} `, element("b", { "data-stat": id }, "–"));
  const status = element("span", { "data-stat": "status" }, "connecting…");
  const canvas = element("canvas", { "data-role": "board" });
  const tbody = element("tbody", { "data-role": "jobs" });
  const mine = element("div", { class: "mine", "data-role": "mine" });
  const root = element("div", { class: "tetriserve-panel", "data-testid": "tetriserve-panel" },
    element("header", {}, element("b", {}, "TetriServe"), stat("sar", "SAR"), stat("policy", "policy"),
      stat("busy", "GPUs busy"), stat("open", "open jobs"), status, element("span", { "data-stat": "url" }, "")),
    canvas, mine, element("div", { class: "jobs", "data-role": "jobs-scroll" }, element("table", {}, element("thead"), tbody)));
  container.appendChild(root);

  const view = { root, canvas, tbody, mine, status, lastBoard: null, timer: null, busy: false };
  const set = (id, text) => { root.querySelector(`[data-stat="${id}"]`).textContent = text; };

  async function refresh() {
    if (!root.isConnected) { stopView(view); return; }
    if (view.busy) return;
    view.busy = true;
    try {
      const lib = await loadBoardLibrary();
      const thead = root.querySelector("thead");
      if (!thead.children.length) thead.appendChild(element("tr", {}, ...lib.COLUMNS.map((c) => element("th", {}, c))));
      const resp = await api.fetchApi(`/tetriserve/board?window_s=${WINDOW_S}`);
      const doc = await resp.json();
      set("url", doc.service_url ? `· ${doc.service_url}` : "");
      if (!resp.ok) throw new Error(doc.error?.message || `HTTP ${resp.status}`);
      const s = lib.summary(doc);
      for (const key of ["sar", "policy", "busy", "open"]) set(key, s[key]);
      status.textContent = "live"; status.className = "";
      view.lastBoard = doc;
      lib.draw(doc, canvas);
      lib.table(doc, tbody);
      renderMine(view, lib);
    } catch (err) {
      status.textContent = `service unreachable: ${err.message}`; status.className = "bad";
    } finally {
      view.busy = false;
    }
  }

  view.refresh = refresh;
  mounted.add(view);
  refresh();
  view.timer = setInterval(refresh, POLL_MS);
}

function stopView(view) {
  clearInterval(view.timer);
  mounted.delete(view);
}

function renderMine(view, lib) {
  // the phase text comes from the latest board when the job is on it (a pushed text ages: "finish in 3 s")
  const board = view.lastBoard;
  const onBoard = new Map((board ? board.jobs : []).map((j) => [j.job_id, j]));
  const items = [...recent.values()].slice(-MAX_RECENT).reverse().map((e) => {
    const j = onBoard.get(e.job_id);
    const text = j ? lib.phaseText(j, board.now_at) : e.text;
    return element("div", { "data-job": e.job_id }, element("span", { class: "swatch", style: `background:${lib.colour(e.job_id)}` }),
      `node #${e.node}: ${text}`);
  });
  view.mine.replaceChildren(...(items.length ? [element("div", {}, "this ComfyUI's samplers:"), ...items] : []));
}

api.addEventListener("tetriserve.job", (event) => {
  const e = event.detail;
  recent.delete(e.job_id);
  recent.set(e.job_id, e);
  while (recent.size > 32) recent.delete(recent.keys().next().value);
  for (const view of mounted) view.refresh();
});

app.registerExtension({
  name: "comfy_tetriserve.board",
  bottomPanelTabs: [
    { id: TAB_ID, title: "TetriServe", type: "custom", render: (el) => mount(el) },
  ],
  commands: [
    { id: "TetriServe.ShowBoard", label: "Show the TetriServe board", icon: "pi pi-th-large",
      function: () => app.extensionManager.command.execute(`Workspace.ToggleBottomPanelTab.${TAB_ID}`) },
  ],
});
