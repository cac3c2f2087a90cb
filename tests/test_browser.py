"""Tier D: every example workflow in the real graph editor (headless Chromium): it loads with no
missing node types, queues from the frontend, runs to success, and leaves a screenshot."""

from __future__ import annotations

import pytest
import requests
from conftest import require

from supercond.tools import paths, workflows

pytestmark = [pytest.mark.comfy, pytest.mark.server, pytest.mark.browser]


@pytest.fixture(scope="module")
def page(server):
    try:
        import playwright  # noqa: F401
        have_playwright = True
    except ImportError:
        have_playwright = False
    require("Playwright", have_playwright, "pip install playwright (the README's set-up does it)")
    require("Chromium", paths.chromium_path() is not None, "apt-get install chromium")
    from supercond.tools.browser import open_app

    with open_app(server.url) as p:
        yield p


def test_the_frontend_extension_is_loaded(page):
    assert page.evaluate("() => window.app.extensions.some(e => e.name === 'supercond.core')")


@pytest.mark.parametrize("path", workflows.example_paths(), ids=lambda p: p.stem)
def test_example_loads_queues_and_succeeds_in_the_editor(page, server, path, artifacts):
    from supercond.tools import browser

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
    browser.shrink_graph(page, size=64, max_steps=3)
    browser.set_widgets(page, "KSampler", {"seed": 1234})
    # live previews ComfyUI's progress bar sends for a node (the trainer's sample images), by node id
    page.evaluate("""() => { window.__scPreviews = [];
        window.app.api.addEventListener('b_preview_with_metadata', (e) =>
            window.__scPreviews.push(String(e.detail.displayNodeId ?? e.detail.nodeId))); }""")
    result = browser.queue_and_wait(page, timeout_ms=300_000)
    browser.screenshot(page, artifacts / f"browser_{path.stem}.png")
    if result["status"] != "success":  # don't leave a long run blocking the next tests
        requests.post(f"{server.url}/interrupt", json={}, timeout=10)
        requests.post(f"{server.url}/queue", json={"clear": True}, timeout=10)
    assert result["status"] == "success", result
    assert not page.page_errors, page.page_errors
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


def _widget(node: dict, name: str):
    """A widget's value in a UI-format node, by its input name."""
    names = [i["name"] for i in node.get("inputs", []) if i.get("widget")]
    values = node.get("widgets_values", [])
    return values[names.index(name)] if name in names and names.index(name) < len(values) else None
