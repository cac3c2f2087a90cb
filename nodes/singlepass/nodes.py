"""Single-pass superconditioned sampling nodes: attach or load a second head, sample with it."""

from __future__ import annotations

import logging
import os

import comfy.samplers
import folder_paths
from comfy_api.v0_0_2 import io

from ...core import heads as core_heads
from ..checked import CheckedNode
from ..inputs import register_model_folder
from . import hook

log = logging.getLogger("supercond.singlepass")

CATEGORY = "supercond/singlepass"
FOLDER = "supercond_heads"


# .pt & co. are listed on purpose: picking one gets "not a safetensors file", not silence.
register_model_folder(FOLDER, folder_paths.supported_pt_extensions)

_HEAD_TIP = ("projection: a copy of the final projection (tiny, ~free). last_block: a copy of the last block "
             "and the projection (stronger, costs one block per step). Both start as 'no guidance' (= cfg 1).")
_NEG_TIP = ("head (default): the head stands in for the negative at one model call per step. A head trained "
            "with negative_prompts (SupercondTrainHead; SD1.x and Wan last_block heads) reads the wired negative; "
            "any other head predicts the output for an EMPTY prompt and the wired negative is not evaluated "
            "(the log says which). real_cfg: always run true two-pass CFG with the wired negative (no speed-up).")


class SupercondNewHead(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondNewHead",
            display_name="New Single-Pass Head",
            category=CATEGORY,
            description=("Attaches a fresh second (unconditional) output head, copied from the model's own tail. "
                         "Untrained it predicts no guidance: single-pass sampling gives the cfg 1 image."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("head", options=list(core_heads.HEAD_TYPES), default="projection", tooltip=_HEAD_TIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, head) -> io.NodeOutput:
        return io.NodeOutput(hook.attach_head(model, hook.new_head(model, head)))


class SupercondLoadHead(CheckedNode):
    FILE_INPUTS = ("head_name",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondLoadHead",
            display_name="Load Single-Pass Head",
            category=CATEGORY,
            description=("Loads a trained unconditional head (safetensors from models/supercond_heads) onto the "
                         "model. A head for another model family, prediction type or width is refused."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("head_name", options=head_names(),
                               tooltip=f"A head file in the {FOLDER} model folder (extra_model_paths.yaml works)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def relations(cls, head_name=None, **_) -> str | None:
        return head_path(head_name)[1] if head_name is not None else None

    @classmethod
    def execute(cls, model, head_name) -> io.NodeOutput:
        path, problem = head_path(head_name)
        if problem:
            raise ValueError(problem)
        try:
            head = hook.head_from_file(model, path, name=head_name)
        except core_heads.HeadFileError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(hook.attach_head(model, head))


def head_names() -> list[str]:
    """Files in the heads folder(s), less SupercondTrainHead's resume states (``.state.pt``)."""
    return [n for n in folder_paths.get_filename_list(FOLDER) if not n.endswith(".state.pt")]


def head_path(name: str) -> tuple[str | None, str | None]:
    """The full path of a head file, or why there is none (missing folder, missing file)."""
    folders = folder_paths.get_folder_paths(FOLDER)
    if not any(os.path.isdir(p) for p in folders):
        return None, (f"the {FOLDER} model folder does not exist (looked in: {', '.join(folders)}); create it "
                      "and put head .safetensors files there, or add it in extra_model_paths.yaml")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        return None, f"head file {name!r} is not in the {FOLDER} folder(s): {', '.join(folders)}"
    return path, None


class SupercondSinglePass(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondSinglePass",
            display_name="Single-Pass CFG",
            category=CATEGORY,
            description=("Classifier-free guidance from ONE model call per step: the unconditional prediction "
                         "comes from the head, in the same pass. Works with the stock KSampler (cfg stays its "
                         "setting) and with RescaleCFG, CFGZeroStar, APG and other nodes that read the uncond."),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL with a head (SupercondNewHead / SupercondLoadHead), or a "
                                                "checkpoint trained with doubled output channels."),
                io.Int.Input("real_cfg_steps", default=0, min=0, max=10000,
                             tooltip="Run true two-pass CFG for this many first steps (where guidance shapes the "
                                     "composition most), the head afterwards. Counted by noise level: model calls "
                                     "above the noise level of step N are two-pass (heun's corrector of step N-1 "
                                     "already uses the head)."),
                io.Combo.Input("negative", options=list(hook.NEGATIVE_MODES), default="head", tooltip=_NEG_TIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, real_cfg_steps, negative) -> io.NodeOutput:
        config = hook.SinglePassConfig(real_cfg_steps=real_cfg_steps, negative=negative)
        return io.NodeOutput(hook.patch_model(model, config))


class SinglePassGuider(comfy.samplers.CFGGuider):
    """CFGGuider without a negative: the head's prediction is the unconditional branch."""

    def set_conds(self, positive) -> None:
        # The negative slot only has to be non-empty so the cfg path runs; the head replaces it.
        self.inner_set_conds({"positive": positive, "negative": positive})


class SupercondSinglePassGuider(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondSinglePassGuider",
            display_name="Single-Pass CFG Guider",
            category=CATEGORY,
            description=("A GUIDER for SamplerCustomAdvanced: CFG at the given scale from one model call per step, "
                         "the unconditional prediction coming from the model's head. No negative prompt."),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL with a head (SupercondNewHead / SupercondLoadHead)."),
                io.Conditioning.Input("positive"),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale. 1 = no guidance (the head is not even run)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, cfg) -> io.NodeOutput:
        config = hook.installed_config(model)
        if config is not None and (config.real_cfg_steps or config.negative != "head"):
            raise ValueError("SupercondSinglePassGuider has no negative prompt, so it cannot run real CFG steps: "
                             "connect the MODEL from SupercondNewHead/SupercondLoadHead directly, or set "
                             "real_cfg_steps 0 and negative 'head' on SupercondSinglePass")
        if config is None:
            model = hook.patch_model(model, hook.SinglePassConfig())
        guider = SinglePassGuider(model)
        guider.set_conds(positive)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES: list[type[io.ComfyNode]] = [
    SupercondNewHead,
    SupercondLoadHead,
    SupercondSinglePass,
    SupercondSinglePassGuider,
]
