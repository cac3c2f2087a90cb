// The dataset node's summary (images, repeats, bucket sizes, masks, cache size) shown in the node: the
// server sends it as the node's ui "text", which the stock frontend only displays for its own preview nodes.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "supercond.DatasetSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SupercondLoadDataset") return;
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = executed?.apply(this, arguments);
      const text = message?.text?.[0];
      if (typeof text !== "string") return r;
      if (!this.__scSummary) {
        const box = document.createElement("pre");
        box.style.cssText = "margin:0;padding:4px;font:11px monospace;color:#ccc;white-space:pre-wrap;overflow:auto";
        const widget = this.addDOMWidget("dataset_summary", "dataset_summary", box, {
          serialize: false, getMinHeight: () => 64,
        });
        widget.serialize = false; // keep it out of widgets_values
        this.__scSummary = box;
      }
      this.__scSummary.textContent = text;
      this.setDirtyCanvas?.(true, true);
      return r;
    };
  },
});
