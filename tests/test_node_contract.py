"""Tier B: every node's schema builds in the real ComfyUI, and its public surface is frozen.

Saved workflows store widget values by position, so a renamed, removed or reordered input breaks
them. ``tests/snapshots/node_info.json`` holds what /object_info serves for each node; to accept
a deliberate change, run with SUPERCOND_UPDATE_SNAPSHOTS=1 and say why in the commit.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

SNAPSHOT = Path(__file__).parent / "snapshots" / "node_info.json"


@pytest.fixture(scope="module")
def node_classes(comfy):
    from supercond.nodes import comfy_entrypoint

    ext = asyncio.run(comfy_entrypoint())
    return asyncio.run(ext.get_node_list())


def public_surface(info: dict) -> dict:
    """The parts of node info that saved workflows and API prompts depend on."""
    inputs = info["input"]
    return {
        "input_order": info["input_order"],
        "input_types": {section: {name: spec[0] if isinstance(spec[0], str) else "COMBO"
                                  for name, spec in inputs.get(section, {}).items()}
                        for section in ("required", "optional")},
        "output": list(info["output"]),
        "output_name": list(info["output_name"]),
        "output_node": info["output_node"],
        "category": info["category"],
    }


def test_ids_and_categories_follow_the_house_rules(node_classes):
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("Supercond"), schema.node_id
        assert schema.category.startswith("supercond/"), schema.category
        assert schema.description, f"{schema.node_id} has no description"


def test_every_widget_has_a_tooltip(node_classes):
    for cls in node_classes:
        info = cls.GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                widget = not isinstance(spec[0], str) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if widget:
                    assert opts.get("tooltip"), f"{info['name']}.{name} has no tooltip"


def test_public_surface_matches_the_snapshot(node_classes):
    current = {cls.GET_SCHEMA().node_id: public_surface(cls.GET_NODE_INFO_V1()) for cls in node_classes}
    if os.environ.get("SUPERCOND_UPDATE_SNAPSHOTS") == "1" or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(exist_ok=True)
        old = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else {}
        SNAPSHOT.write_text(json.dumps({**old, **current}, indent=1, sort_keys=True) + "\n")
    frozen = json.loads(SNAPSHOT.read_text())
    for node_id, surface in frozen.items():
        assert node_id in current, f"node {node_id} was removed: saved workflows using it will break"
        now = current[node_id]
        old_order = [n for sec in ("required", "optional") for n in surface["input_order"].get(sec, [])]
        new_order = [n for sec in ("required", "optional") for n in now["input_order"].get(sec, [])]
        assert new_order[: len(old_order)] == old_order, (
            f"{node_id}: inputs renamed, removed or reordered ({old_order} -> {new_order}); "
            "append new inputs at the end instead")
        assert now["output"][: len(surface["output"])] == surface["output"], f"{node_id}: outputs changed"
        for sec, types in surface["input_types"].items():
            for name, kind in types.items():
                assert now["input_types"].get(sec, {}).get(name) == kind, f"{node_id}.{name}: type changed"


def test_every_number_and_choice_is_checked_when_queued(node_classes):
    """ComfyUI 0.3.64 never checks a V3 combo's value and lets NaN and infinity through every FLOAT (issue 16's
    fuzzer found CADS's ``branch=0`` reaching the sampler as a bare KeyError, and ``conditioning={"a": 1}``
    reaching SupercondPlotPerturbation): every node refuses, by name, a NaN, infinite or out-of-range number,
    a choice it does not offer and a value given where a link belongs, and takes its defaults."""
    from comfy_api.v0_0_2 import io

    from supercond.nodes.checked import CheckedNode

    for cls in node_classes:
        schema = cls.define_schema()
        assert issubclass(cls, CheckedNode), f"{schema.node_id} does not check its inputs"
        checked = [i for i in schema.inputs if i.id not in cls.FILE_INPUTS]
        for i in checked:
            bad = [float("nan"), float("inf"), i.max + 1, i.min - 1] if isinstance(i, (io.Int.Input, io.Float.Input)) \
                else ["not a choice", 0] if isinstance(i, io.Combo.Input) \
                else [{"a": 1}, 0] if not isinstance(i, io.WidgetInput) else []  # a value where a link belongs
            for value in bad:
                answer = cls.validate_inputs(**{i.id: value})
                assert isinstance(answer, str) and i.id in answer, (schema.node_id, i.id, value, answer)
        defaults = {i.id: i.default for i in checked if getattr(i, "default", None) is not None}
        assert cls.validate_inputs(**defaults) is True, schema.node_id


DOCS = Path(__file__).resolve().parent.parent / "js" / "docs"


def _flat(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_every_node_has_a_help_page_that_says_what_its_schema_says(node_classes):
    """The frontend's node library shows <web directory>/docs/<node_id>.md (js/docs/ here; the browser tier
    opens some): a page per node, quoting the node's description and every input's tooltip as the schema
    has them (so page and tooltip cannot drift apart), and every image and example workflow it names exists."""
    import re

    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        page = _flat((DOCS / f"{schema.node_id}.md").read_text(encoding="utf-8"))
        assert _flat(schema.description) in page, f"{schema.node_id}.md: the description differs from the schema's"
        for spec in schema.inputs:
            assert f"**{spec.id}**" in page, f"{schema.node_id}.md does not describe input {spec.id}"
            if spec.tooltip:
                assert _flat(spec.tooltip) in page, f"{schema.node_id}.md: {spec.id}'s text differs from its tooltip"
        for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page):
            assert (DOCS / image).is_file(), f"{schema.node_id}.md shows {image}, which is not in js/docs/"
        for name in re.findall(r"workflows/([\w.-]+\.json)", page):
            assert (DOCS.parent.parent / "workflows" / name).is_file(), f"{schema.node_id}.md names {name}"
