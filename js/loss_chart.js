// Live loss chart inside the trainer nodes (SupercondTrainLoRA, SupercondTrainHead): a canvas DOM widget fed by the throttled
// "supercond.loss" event ({node, steps, losses, total, reset}) that nodes/events.py sends.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINER_NODES = new Set(["SupercondTrainLoRA", "SupercondTrainHead"]);

function draw(node) {
  const c = node.__scLoss?.canvas;
  if (!c) return;
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth || 200, h = c.clientHeight || 120;
  c.width = w * dpr; c.height = h * dpr;
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#1b1b1b"; ctx.fillRect(0, 0, w, h);
  const pts = node.__scLoss.points;
  if (pts.length < 2) {
    ctx.fillStyle = "#888"; ctx.font = "11px sans-serif";
    ctx.fillText("loss appears here while training", 8, h / 2);
    return;
  }
  // log scale: losses span orders of magnitude early on
  const ys = pts.map(p => Math.log10(Math.max(p[1], 1e-8)));
  const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
  const total = Math.max(node.__scLoss.total, pts[pts.length - 1][0]);
  ctx.strokeStyle = "#5fb3ff"; ctx.lineWidth = 1.5; ctx.beginPath();
  pts.forEach((p, i) => {
    const x = 6 + (w - 12) * (p[0] / total), y = h - 14 - (h - 24) * ((ys[i] - lo) / span);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  const last = pts[pts.length - 1];
  ctx.fillStyle = "#ccc"; ctx.font = "11px sans-serif";
  ctx.fillText(`step ${last[0]}/${node.__scLoss.total}  loss ${last[1].toPrecision(4)}`, 6, h - 3);
}

app.registerExtension({
  name: "supercond.LossChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TRAINER_NODES.has(nodeData.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      const canvas = document.createElement("canvas");
      canvas.style.width = "100%"; canvas.style.height = "100%";
      const widget = this.addDOMWidget("loss_chart", "loss_chart", canvas, {
        serialize: false, getMinHeight: () => 120,
      });
      widget.serialize = false; // keep it out of widgets_values too
      this.__scLoss = { canvas, points: [], total: 0, pending: false };
      requestAnimationFrame(() => draw(this)); // the placeholder text until the first loss arrives
      return r;
    };
  },
  async setup() {
    api.addEventListener("supercond.loss", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
      if (!node?.__scLoss) return;
      const s = node.__scLoss;
      if (detail.reset) s.points = [];
      detail.steps.forEach((st, i) => s.points.push([st, detail.losses[i]]));
      s.total = detail.total;
      if (!s.pending) { // one redraw per frame however many events arrive
        s.pending = true;
        requestAnimationFrame(() => { s.pending = false; draw(node); });
      }
    });
  },
});
