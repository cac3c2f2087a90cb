// Supercond frontend extension entry point. Every .js file in this folder is loaded by ComfyUI.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "supercond.core",
  async setup() {
    // Marker the browser tests read to confirm the pack's frontend code was loaded.
    window.supercond = Object.assign(window.supercond || {}, { loaded: true });
  },
});
