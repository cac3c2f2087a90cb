"""Tier B: the guarded fallbacks of docs/compat.md. Where newer ComfyUI changed a call the pack makes, the
pack works with both; each test runs the 0.3.64 path for real and the newer one by simulating it here."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


def test_the_perturbation_wrapper_passes_on_what_newer_comfyui_adds(comfy, fixture_checkpoints):
    """Newer CFGGuider.sample calls the OUTER_SAMPLE chain with latent_shapes=: CEP's wrapper takes it and
    hands it on unchanged, with its run state set for the call and gone after."""
    import comfy.samplers
    from comfy_helpers import encode, load_family

    from supercond.nodes.perturb.hook import CEPConfig, PerturbHook

    fam = load_family("eps", fixture_checkpoints)
    guider = comfy.samplers.CFGGuider(fam.model)
    guider.set_conds(encode(fam, "a red cube"), encode(fam, ""))
    guider.conds = {k: [c.copy() for c in v] for k, v in guider.original_conds.items()}  # as sample() does
    hook = PerturbHook(CEPConfig(1.0, "uniform", "paper", "tokens", "positive", "every_step"), "test")
    seen = {}

    class Executor:  # the next link of the chain, as ComfyUI's WrapperExecutor calls it
        class_obj = guider

        def __call__(self, *args, **kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            seen["state"] = guider.model_options["transformer_options"].get(hook._key)
            return "sampled"

    sigmas = torch.tensor([14.6, 1.0, 0.0])
    args = (torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), None, sigmas, None, None, True, 7)
    assert hook.outer_sample(Executor(), *args, latent_shapes=[(1, 4, 8, 8)]) == "sampled"
    assert seen["kwargs"] == {"latent_shapes": [(1, 4, 8, 8)]} and len(seen["args"]) == len(args)
    assert seen["state"] is not None and seen["state"].seed == 7
    assert hook._key not in guider.model_options["transformer_options"]
    assert hook.outer_sample(Executor(), *args) == "sampled" and seen["kwargs"] == {}  # 0.3.64's call


def test_headless_builds_the_executor_of_either_comfyui(comfy):
    """scripts/train's executor: 0.3.64's PromptExecutor(server); newer ComfyUI's takes cache_args and reads
    its RAM headroom on every run, which a PromptExecutor(server) there lacks."""
    import execution

    from supercond.tools import headless

    got = {}

    class Newer(execution.PromptExecutor):
        def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
            got["cache_args"] = cache_args
            super().__init__(server, cache_type)

    reports = headless._Reports()
    assert type(headless._executor(execution, reports)) is execution.PromptExecutor

    class Module:
        PromptExecutor = Newer

    assert isinstance(headless._executor(Module, reports), Newer)
    assert {"ram", "ram_inactive"} <= set(got["cache_args"]) and got["cache_args"]["ram"] == 0.0


def test_string_to_seed_is_taken_from_where_this_comfyui_has_it(comfy, monkeypatch):
    """comfy.utils.string_to_seed in newer ComfyUI (the comfy.model_patcher name warns there); 0.3.64 has
    only comfy.model_patcher's."""
    import comfy.model_patcher
    import comfy.utils

    from supercond.nodes.singlepass.hook import _string_to_seed

    if not hasattr(comfy.utils, "string_to_seed"):
        assert _string_to_seed() is comfy.model_patcher.string_to_seed
    newer = lambda text: 42  # noqa: E731
    monkeypatch.setattr(comfy.utils, "string_to_seed", newer, raising=False)
    assert _string_to_seed() is newer


def test_a_node_whose_internal_is_missing_says_so_and_the_others_work(comfy, monkeypatch, caplog):
    """Start-up self-check, with one internal taken away as a newer ComfyUI might: all 18 nodes are still
    registered, one log line names the node and what is missing, queueing and running that node give the
    same sentence, every other node is untouched; with the internal back the node works again."""
    import asyncio
    import logging

    import comfy.patcher_extension

    from supercond.nodes import comfy_entrypoint
    from supercond.nodes.errors import InputError

    ext = asyncio.run(comfy_entrypoint())
    monkeypatch.delattr(comfy.patcher_extension.WrappersMP, "PREDICT_NOISE")
    with caplog.at_level(logging.ERROR, logger="supercond"):
        classes = asyncio.run(ext.get_node_list())
    by_id = {cls.define_schema().node_id: cls for cls in classes}
    node = by_id.pop("SupercondEpsilonScaling")
    assert len(classes) == 18 and node.unavailable is not None
    assert "SupercondEpsilonScaling cannot work with this ComfyUI" in node.unavailable
    assert "comfy.patcher_extension.WrappersMP.PREDICT_NOISE" in node.unavailable
    logged = [r.getMessage() for r in caplog.records if "cannot work" in r.getMessage()]
    assert len(logged) == 1 and node.unavailable in logged[0]
    assert all(cls.unavailable is None for cls in by_id.values())
    assert node.validate_inputs() == node.unavailable  # the queue refuses it with the sentence
    with pytest.raises(InputError) as err:
        node.EXECUTE_NORMALIZED(model=None, k=0.0, b=1.0)
    assert str(err.value) == node.unavailable
    monkeypatch.undo()
    asyncio.run(ext.get_node_list())
    assert node.unavailable is None and node.validate_inputs() is True
