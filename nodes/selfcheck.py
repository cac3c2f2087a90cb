"""Start-up self-check: the ComfyUI internals each node relies on (docs/compat.md lists them all; these are
the ones a node cannot work without). When this ComfyUI lacks one, that node is still registered (saved
workflows keep loading), start-up logs one line naming it and what is missing, and queueing or running it
fails with the same sentence; the rest of the pack works as usual."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("supercond")

_WRAPPERS = "comfy.patcher_extension:WrappersMP"
_PATCHER = "comfy.model_patcher:ModelPatcher"
_SAMPLING = ("comfy.samplers:calculate_sigmas", "comfy.samplers:CFGGuider", "comfy.sample:prepare_noise",
             "comfy.sample:fix_empty_latent_channels")
_WRAPPED = (f"{_PATCHER}.add_wrapper_with_key", f"{_PATCHER}.remove_wrappers_with_key")
_TRAINING = ("comfy.model_management:load_models_gpu", "comfy.model_management:throw_exception_if_processing_interrupted",
             "comfy.utils:ProgressBar", "comfy.sd:load_lora_for_models", "comfy.lora:model_lora_keys_unet",
             "folder_paths:get_folder_paths")
_HEADS = (*_WRAPPED, f"{_WRAPPERS}.OUTER_SAMPLE", f"{_WRAPPERS}.CALC_COND_BATCH", f"{_WRAPPERS}.APPLY_MODEL",
          f"{_PATCHER}.set_attachments", f"{_PATCHER}.get_attachment", "comfy.lora:calculate_weight",
          "comfy.float:stochastic_rounding")

NEEDS: dict[str, tuple[str, ...]] = {  # node id -> "module:attribute.path" it cannot work without
    "SupercondPerturbConditioning": (),
    "SupercondCEP": (*_WRAPPED, f"{_WRAPPERS}.OUTER_SAMPLE", f"{_WRAPPERS}.CALC_COND_BATCH"),
    "SupercondCADS": (*_WRAPPED, f"{_WRAPPERS}.OUTER_SAMPLE", f"{_WRAPPERS}.CALC_COND_BATCH"),
    "SupercondPlotPerturbation": (),
    "SupercondNoiseCorrection": (*_WRAPPED, f"{_WRAPPERS}.SAMPLER_SAMPLE", "comfy.samplers:CFGGuider"),
    "SupercondEpsilonScaling": (*_WRAPPED, f"{_WRAPPERS}.PREDICT_NOISE"),
    "SupercondScheduleSigmas": ("comfy.samplers:calculate_sigmas",),
    "SupercondOffsetNoise": ("comfy.sample:prepare_noise",),
    "SupercondPlotSigmas": ("comfy.samplers:calculate_sigmas",),
    "SupercondFitSchedule": (*_SAMPLING, "comfy.samplers:KSAMPLER", "comfy.utils:ProgressBar"),
    "SupercondLoadSchedule": ("folder_paths:get_folder_paths",),
    "SupercondNewHead": _HEADS,
    "SupercondLoadHead": (*_HEADS, "comfy.utils:load_torch_file"),
    "SupercondSinglePass": _HEADS,
    "SupercondSinglePassGuider": (*_HEADS, "comfy.samplers:CFGGuider"),
    "SupercondLoadDataset": ("folder_paths:get_input_directory", "comfy.utils:ProgressBar"),
    "SupercondTrainLoRA": _TRAINING,
    "SupercondTrainHead": (*_TRAINING, *_HEADS),
}


def missing(need: str) -> bool:
    """Whether ``module:attr.path`` cannot be found in this ComfyUI."""
    module, _, path = need.partition(":")
    try:
        found = importlib.import_module(module)
    except ImportError:
        return True
    for part in filter(None, path.split(".")):
        if not hasattr(found, part):
            return True
        found = getattr(found, part)
    return False


def sentence(node_id: str, gone: list[str]) -> str:
    names = ", ".join(n.replace(":", ".") for n in gone)
    return (f"{node_id} cannot work with this ComfyUI: it needs {names}, which this version does not have "
            "(see docs/compat.md in the Supercond folder for the versions it supports); the other Supercond "
            "nodes work")


def check(classes: list[type]) -> dict[str, str]:
    """Mark each node class usable or not (its ``unavailable`` sentence, or None) and log one line per node
    that cannot work; returns {node id: sentence} of those."""
    found: dict[str, str] = {}
    for cls in classes:
        node_id = cls.define_schema().node_id
        gone = [n for n in NEEDS.get(node_id, ()) if missing(n)]
        cls.unavailable = sentence(node_id, gone) if gone else None
        if gone:
            found[node_id] = cls.unavailable
            log.error("supercond: %s", cls.unavailable)
    return found
