"""Drive the real ComfyUI frontend in headless Chromium (Playwright on Debian's chromium)."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from .paths import chromium_path

log = logging.getLogger("supercond.tools.browser")


@contextmanager
def open_app(url: str, width: int = 1600, height: int = 1000):
    """A page with the ComfyUI app loaded and the first-run template dialog suppressed."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("Chromium not found: install Debian's chromium package (apt-get install chromium)")
    requests.post(f"{url}/settings/Comfy.TutorialCompleted", data=json.dumps(True), timeout=10)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
        page.goto(url)
        page.wait_for_function("() => window.app?.extensionManager && window.app.graph", timeout=90_000)
        page.wait_for_function("() => window.supercond?.loaded === true", timeout=30_000)
        # Errors the frontend raises while starting (e.g. frontend 1.27.10 throws one while
        # registering its core settings) are not ours: keep them apart, logged.
        page.startup_errors = list(errors)  # type: ignore[attr-defined]
        for e in page.startup_errors:
            log.warning("frontend error during start-up: %s", e.splitlines()[0])
        errors.clear()
        page.page_errors = errors  # type: ignore[attr-defined]
        try:
            yield page
        finally:
            browser.close()


def load_workflow(page: Any, workflow: dict) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, null, "
                  "{showMissingNodesDialog: false, showMissingModelsDialog: false}); }", workflow)


def missing_node_types(page: Any, workflow: dict) -> list[str]:
    types = sorted({n["type"] for n in workflow.get("nodes", [])})
    return page.evaluate("(types) => types.filter(t => !window.LiteGraph.registered_node_types[t])", types)


def set_widgets(page: Any, node_type: str, values: dict[str, Any]) -> int:
    """Set widget values on every node of a type, as a user would; returns how many nodes changed."""
    return page.evaluate(
        """([type, values]) => {
            let n = 0;
            for (const node of window.app.graph._nodes.filter(nd => nd.type === type)) {
                for (const w of node.widgets || []) if (w.name in values) { w.value = values[w.name]; n++; }
            }
            window.app.graph.setDirtyCanvas(true, true);
            return n;
        }""",
        [node_type, values],
    )


def shrink_graph(page: Any, size: int = 64, max_steps: int = 4) -> None:
    """The editor-side twin of ``tools.workflows.shrink``: set the same widgets a user would
    turn down (latent size, any ``steps``, the schedule fit's ``teacher_steps``, a dataset ``resolution``, the trainer's sample prompts'
    steps and size) so examples run quickly on the tiny fixtures; also an empty latent's batch, to 2 (a browser
    run checks that the example runs and shows its outputs; the API tests keep the example's batch)."""
    page.evaluate(
        """([size, maxSteps]) => {
            for (const node of window.app.graph._nodes) {
                for (const w of node.widgets || []) {
                    if (w.name === "sample_prompts" && typeof w.value === "string")  // later options win
                        w.value = w.value.split("\\n").map((l) => l.trim() && !l.trim().startsWith("#")
                            ? `${l} --s ${maxSteps} --w ${size} --h ${size}` : l).join("\\n");
                    if (typeof w.value !== "number") continue;
                    if (node.type.startsWith("Empty") && (w.name === "width" || w.name === "height")) w.value = size;
                    if (w.name === "resolution") w.value = Math.min(w.value, size);
                    if (w.name === "steps") w.value = Math.min(w.value, maxSteps);
                    if (w.name === "teacher_steps") w.value = Math.min(w.value, 4 * maxSteps);
                    if (node.type.startsWith("Empty") && w.name === "length") w.value = Math.min(w.value, 5);
                    if (node.type.startsWith("Empty") && w.name === "batch_size") w.value = Math.min(w.value, 2);
                }
            }
            window.app.graph.setDirtyCanvas(true, true);
        }""",
        [size, max_steps],
    )


def use_standin_encoders(page: Any, standin: str, family_for_type: dict[str, str],
                         loaders: tuple[str, ...]) -> int:
    """Replace each text-encoder loader whose ``type`` has a stand-in by the test server's stand-in
    node (tools/workflows.STANDIN), wired to the same inputs; the editor-side twin of ``retarget``'s
    swap. Returns how many loaders were replaced."""
    return page.evaluate(
        """([standin, families, loaders]) => {
            const g = window.app.graph;
            const link = (id) => (g.links.get ? g.links.get(id) : g.links[id]);
            let swapped = 0;
            for (const node of [...g._nodes]) {
                if (!loaders.includes(node.type)) continue;
                const type = (node.widgets || []).find((w) => w.name === "type");
                if (!type || !(type.value in families)) continue;
                const repl = window.LiteGraph.createNode(standin);
                repl.pos = [...node.pos];
                g.add(repl);
                repl.widgets.find((w) => w.name === "family").value = families[type.value];
                const targets = (node.outputs[0].links || []).map(link).map((l) => [l.target_id, l.target_slot]);
                for (const [id, slot] of targets) repl.connect(0, g.getNodeById(id), slot);
                g.remove(node);
                swapped += 1;
            }
            g.setDirtyCanvas(true, true);
            return swapped;
        }""",
        [standin, family_for_type, list(loaders)],
    )


def queue_and_wait(page: Any, timeout_ms: int = 600_000) -> dict:
    """Queue the loaded graph as the Run button does; wait for that prompt's success or error.

    The /prompt response is captured around ``api.queuePrompt``: ``app.queuePrompt``'s own return
    value cannot tell (frontend 1.27.10 returns ``!node_errors``, false for the ``{}`` of a success).
    """
    return page.evaluate(
        """(timeout) => new Promise((resolve) => {
            const api = window.app.api;
            let promptId = null;
            const pending = [];
            const done = (status, detail) => { clearTimeout(timer); resolve({status, detail, promptId}); };
            const timer = setTimeout(() => done("timeout", null), timeout);
            const onEnd = (status) => (e) => {
                if (promptId === null) pending.push([status, e.detail]);
                else if (e.detail?.prompt_id === promptId) done(status, e.detail);
            };
            api.addEventListener("execution_success", onEnd("success"));
            api.addEventListener("execution_error", onEnd("error"));
            const original = api.queuePrompt;
            api.queuePrompt = async function (...args) {
                api.queuePrompt = original;
                try {
                    const res = await original.apply(api, args);
                    promptId = res.prompt_id;
                    for (const [status, detail] of pending) if (detail?.prompt_id === promptId) done(status, detail);
                    return res;
                } catch (err) {
                    done("rejected", String(err?.message ?? err));
                    throw err;
                }
            };
            window.app.queuePrompt(0, 1);
        })""",
        timeout_ms,
    )


def graph_to_api(page: Any) -> dict:
    return page.evaluate("async () => (await window.app.graphToPrompt()).output")


def screenshot(page: Any, path: Path, quality: int | None = None) -> Path:
    page.evaluate("() => window.app.canvas.ds && window.app.graph.setDirtyCanvas(true, true)")
    page.wait_for_timeout(300)
    kwargs = {"type": "jpeg", "quality": quality or 80} if path.suffix == ".jpg" else {}
    page.screenshot(path=str(path), **kwargs)
    return path


def open_node_help(page: Any, node_id: str, expect: str, timeout_ms: int = 30_000) -> str:
    """Open a node's help page as a user would see it, and wait until the page shows ``expect``; returns the
    text on screen. The frontend fetches <web directory>/docs/<node_id>.md and renders it. Where it shows
    differs: frontend 1.27 opens it in the node library sidebar (its "?" button: the nodeHelp store); newer
    ones (1.58) in the right-side panel's Info tab of the selected node. Pinia's stores are reached through
    the Vue app, the sidebar tab through its command."""
    page.evaluate("""async ([id, timeout]) => {
        const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
        if (stores.has('rightSidePanel')) {  // newer frontends: select a node of that type, show its Info tab
            const node = window.LiteGraph.createNode(id);
            node.pos = [100, 100];
            window.app.graph.add(node);
            window.app.canvas.selectNode(node);
            stores.get('rightSidePanel').openPanel('info');
            return;
        }
        if (window.app.extensionManager.sidebarTab?.activeSidebarTabId !== 'node-library')
            await window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
        const until = Date.now() + timeout;  // the sidebar creates the nodeHelp store when it mounts
        while (!stores.has('nodeHelp') && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
        const def = stores.get('nodeDef').nodeDefsByName[id];
        if (!def) throw new Error(`no node definition ${id}`);
        stores.get('nodeHelp').openHelp(def);
    }""", [node_id, timeout_ms])
    page.wait_for_function("(expect) => document.body.innerText.includes(expect)", arg=expect, timeout=timeout_ms)
    return page.evaluate("() => document.body.innerText")


def template_names(page: Any, module: str, timeout_ms: int = 30_000) -> list[str]:
    """The workflows the template browser lists under a custom node's ``module`` (its folder name): the
    dialog opened as its menu item does (command Comfy.BrowseTemplates), read from the frontend's
    workflowTemplates store (frontends 1.27 and 1.58 both group them in ``groupedTemplates``), closed again."""
    page.evaluate("async () => await window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    names = page.evaluate("""async ([module, timeout]) => {
        const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
        const until = Date.now() + timeout;
        while (!(stores.get('workflowTemplates')?.isLoaded) && Date.now() < until)
            await new Promise((r) => setTimeout(r, 100));
        const groups = stores.get('workflowTemplates')?.groupedTemplates ?? [];
        return groups.flatMap((g) => g.modules).filter((m) => m.moduleName === module)
            .flatMap((m) => m.templates.map((t) => t.name));
    }""", [module, timeout_ms])
    page.keyboard.press("Escape")
    return names
