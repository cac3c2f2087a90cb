"""Tier D: every example workflow in the real graph editor (headless Chromium): it loads with no
missing node types, queues from the frontend, runs to success with its images, files and plots where
they belong, shows the pack's own UI, and leaves a screenshot."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import require
from PIL import Image

from supercond.tools import frontends, paths, workflows

pytestmark = [pytest.mark.comfy, pytest.mark.server, pytest.mark.browser]


@dataclass
class Frontend:
    name: str  # "bundled" or the version of the newest comfyui-frontend-package
    server: object
    page: object

    def shot(self, stem: str) -> str:
        return f"{stem}.png" if self.name == "bundled" else f"{stem}_frontend_{self.name}.png"


@pytest.fixture(scope="module", params=["bundled", frontends.NEWEST])
def ui(request, server, comfyui, models_dir, tmp_path_factory):
    """The editor in headless Chromium, once with the frontend bundled with this ComfyUI (the session
    server) and once with the newest comfyui-frontend-package (a server of its own, --front-end-root)."""
    try:
        import playwright  # noqa: F401
        have_playwright = True
    except ImportError:
        have_playwright = False
    require("Playwright", have_playwright, "pip install playwright (the README's set-up does it)")
    require("Chromium", paths.chromium_path() is not None, "apt-get install chromium")
    from supercond.tools.browser import open_app
    from supercond.tools.server import ComfyServer

    own = None
    if request.param != "bundled":
        own = ComfyServer(comfyui, tmp_path_factory.mktemp("comfy_frontend"), models_dir=models_dir, standins=True,
                          front_end_root=frontends.newest_static(request.param)).start()
    try:
        with open_app((own or server).url) as p:
            yield Frontend(request.param, own or server, p)
    finally:
        if own is not None:
            alive = own.alive()
            own.stop()
            assert alive, f"the server died during the tests:\n{own.log_tail()}"


def test_the_frontend_extension_is_loaded(ui):
    assert ui.page.evaluate("() => window.app.extensions.some(e => e.name === 'supercond.core')")


def test_the_examples_are_in_the_template_browser(ui):
    from supercond.tools import browser

    names = browser.template_names(ui.page, paths.PACK_DIR.name)
    assert {p.stem for p in workflows.example_paths()} <= set(names), names


@pytest.mark.parametrize("node_id", ["SupercondCEP", "SupercondScheduleSigmas", "SupercondSinglePass",
                                     "SupercondTrainLoRA"])  # one per capability
def test_the_node_library_shows_the_nodes_help_page(ui, node_id, artifacts):
    from supercond.tools import browser

    page = ui.page
    md = (paths.PACK_DIR / "js" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
    title = md.splitlines()[0].removeprefix("# ")
    # the page, not the frontend's fallback (description and an inputs table): only the page has this line
    text = browser.open_node_help(page, node_id, expect=f"{node_id} · category")
    browser.screenshot(page, artifacts / ui.shot(f"help_{node_id}"))
    assert title in text
    assert not page.page_errors, page.page_errors


@pytest.mark.parametrize("path", workflows.example_paths(), ids=lambda p: p.stem)
def test_example_loads_queues_and_succeeds_in_the_editor(ui, path, artifacts):
    from supercond.tools import browser

    page, server = ui.page, ui.server

    wf = workflows.load(path)
    browser.load_workflow(page, wf)
    assert browser.missing_node_types(page, wf) == []
    # What a user does with an example: pick a checkpoint (and LoRA) they have; small and quick here.
    for widget, mapping in workflows.FIXTURE_FOR_WIDGET.items():
        for name, fixture in mapping.items():
            page.evaluate(
                """([widget, name, fixture]) => { for (const n of window.app.graph._nodes)
                    for (const w of n.widgets || []) if (w.name === widget && w.value === name) w.value = fixture; }""",
                [widget, name, fixture],
            )
    browser.use_standin_encoders(page, workflows.STANDIN, workflows.STANDIN_FOR_CLIP_TYPE, workflows.CLIP_LOADERS)
    browser.shrink_graph(page, size=64, max_steps=2)
    browser.set_widgets(page, "KSampler", {"seed": 1234})
    # live previews ComfyUI's progress bar sends for a node (the trainer's sample images), by node id
    page.evaluate("""() => { window.__scPreviews = [];
        window.app.api.addEventListener('b_preview_with_metadata', (e) =>
            window.__scPreviews.push(String(e.detail.displayNodeId ?? e.detail.nodeId))); }""")
    result = browser.queue_and_wait(page, timeout_ms=300_000)
    browser.screenshot(page, artifacts / ui.shot(f"browser_{path.stem}"))
    if result["status"] != "success":  # don't leave a long run blocking the next tests
        requests.post(f"{server.url}/interrupt", json={}, timeout=10)
        requests.post(f"{server.url}/queue", json={"clear": True}, timeout=10)
    assert result["status"] == "success", result
    assert not page.page_errors, page.page_errors
    _outputs_are_where_they_belong(server, result["promptId"], path.stem, artifacts)
    # trainer nodes: the live loss chart received the run's losses over the websocket and drew them
    charts = page.evaluate("""() => window.app.graph._nodes.filter(n => n.__scLoss).map(n => ({
        type: n.type, points: n.__scLoss.points.length, total: n.__scLoss.total,
        drawn: n.__scLoss.canvas.width > 0 }))""")
    trainers = [n for n in wf["nodes"] if n["type"] in ("SupercondTrainLoRA", "SupercondTrainHead")]
    assert len(charts) == len(trainers), charts
    for chart in charts:
        assert chart["points"] == chart["total"] > 0 and chart["drawn"], chart
    # trainers that sample while training: their images reached the node while it ran
    sampling = [str(n["id"]) for n in wf["nodes"] if n["type"] == "SupercondTrainLoRA"
                and _widget(n, "sample_every")]
    previews = page.evaluate("() => window.__scPreviews")
    for node_id in sampling:
        assert node_id in previews, (node_id, previews)
    # the dataset node shows its summary (images, sizes, masks, cache)
    summaries = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type === 'SupercondLoadDataset')
        .map(n => n.__scSummary?.textContent ?? null)""")
    assert all(s and " images, " in s and "cache: " in s for s in summaries), summaries


def _outputs_are_where_they_belong(server, prompt_id: str, stem: str, artifacts) -> None:
    """The run's images came back through /view, trained files landed in the server's own folders (first in
    folder_paths: never ComfyUI's or the fixtures'), and the noise-to-signal plot was shown."""
    entry = requests.get(f"{server.url}/history/{prompt_id}", timeout=30).json()[prompt_id]
    prompt = entry["prompt"][2]
    images = [(node, img) for node, ui in sorted(entry["outputs"].items()) for img in ui.get("images", [])]
    assert images, "the workflow produced no image"
    for i, (node, img) in enumerate(images):
        data = requests.get(f"{server.url}/view", params={"filename": img["filename"], "subfolder": img["subfolder"],
                                                            "type": img["type"]}, timeout=30).content
        Image.open(io.BytesIO(data)).verify()  # a whole image file (PNG, or WEBP from SaveAnimatedWEBP)
        (artifacts / f"e2e_{stem}_{node}_{i}{Path(img['filename']).suffix}").write_bytes(data)
    for trainer, folder in (("SupercondTrainLoRA", server.loras_dir), ("SupercondTrainHead", server.heads_dir),
                            ("SupercondFitSchedule", server.schedules_dir)):
        if any(v["class_type"] == trainer for v in prompt.values()):
            assert list(folder.rglob("*.safetensors")), f"{trainer} saved nothing in {folder}"
    if any(v["class_type"] == "SupercondPlotPerturbation" for v in prompt.values()):
        assert any(prompt[n]["class_type"] == "SupercondPlotPerturbation" for n, _ in images), "no plot shown"


def _widget(node: dict, name: str):
    """A widget's value in a UI-format node, by its input name."""
    names = [i["name"] for i in node.get("inputs", []) if i.get("widget")]
    values = node.get("widgets_values", [])
    return values[names.index(name)] if name in names and names.index(name) < len(values) else None
