"""Single-pass superconditioned sampling through ComfyUI's keyed wrappers.

Three wrappers per patched MODEL, all under one key so they stack with other packs' wrappers:
- OUTER_SAMPLE opens a run: a ``RunState`` object (the head, the schedule, the chunks filed by
  the model call) placed in ``transformer_options``. An object, not a dict: ComfyUI copies the
  dicts and lists of ``transformer_options`` on every model call, an object stays shared.
- CALC_COND_BATCH, on a step that uses the head, sends only the conditional entries to the model
  and rebuilds the unconditional result from the head's chunks (by uuid, with the entries' own
  area and mask), so the stock ``sampling_function``, every pre/post-cfg node and the runtime
  cfg scale work unchanged. cfg 1, real-CFG steps and three-branch guiders pass through.
- APPLY_MODEL captures the features of that one diffusion-model call with module hooks that
  live only for the call, runs the head, turns its output into a denoised prediction with the
  model's own ``calculate_denoised`` (eps, v, flow alike) and files it per cond uuid.
A UNet trained with doubled output channels (seed 003's layout, cond first) is split on every
call, whether or not the step uses guidance.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core import heads as core_heads
from ...core.singlepass import blend, split_doubled, step_index
from .. import family as fm
from ..errors import InputError

log = logging.getLogger("supercond.singlepass")

KEY = "supercond.singlepass"
NODE = "SupercondSinglePass"
ATTACHMENT = "supercond_head"
NEGATIVE_MODES: tuple[str, ...] = ("head", "real_cfg")


def model_spec(model: Any, head_type: str, node: str = "SupercondNewHead") -> core_heads.HeadSpec:
    """What a head of ``head_type`` must be to fit this MODEL."""
    fam = fm.family_of(model, node)
    if head_type not in core_heads.HEAD_TYPES:
        raise InputError(f"head must be one of {list(core_heads.HEAD_TYPES)}, got {head_type!r}")
    net = model.model.diffusion_model
    tail = fam.tail
    features = "+".join(tail.final) if head_type == "projection" else tail.block
    return core_heads.HeadSpec(fam.name, fm.model_prediction(model), features, head_type,
                               feature_width(tail, net, head_type))


def feature_width(tail: fm.Tail, net: nn.Module, head_type: str) -> int:
    """Channels (UNet) or hidden size (DiTs) of the features the head reads."""
    if tail.layout == "unet":
        entry = net.out[0] if head_type == "projection" else fm.resolve(net, tail.block_entry)[0]
        return int(getattr(entry, "num_channels", None) or entry.channels)
    final = fm.resolve(net, tail.final[0])[0]
    return int(next(m for m in final.modules() if isinstance(m, nn.Linear)).in_features)


def native_two_head(model: Any) -> bool:
    """True for a diffusion model with twice the latent channels as output (seed 003's layout)."""
    bm = model.model
    out = getattr(bm.diffusion_model, "out_channels", None)
    return out is not None and out == 2 * bm.latent_format.latent_channels


def _base_copy(model: Any, path: str) -> nn.Module:
    """A detached copy of a diffusion-model module with the weights this MODEL samples with: the
    checkpoint's, with the MODEL's own weight patches (a LoRA from LoraLoader) applied as ComfyUI
    applies them at load, so a fresh head predicts exactly what the patched model does."""
    src, canon = fm.resolve(model.model.diffusion_model, path)
    mod = copy.deepcopy(src)
    backup = getattr(model, "backup", {})
    with torch.no_grad():
        for name, p in mod.named_parameters():
            key = f"diffusion_model.{canon}.{name}"
            saved = backup.get(key)
            if saved is not None:  # some MODEL's patches are in the shared weights right now: the original
                p.copy_(saved.weight)
            patched = _patched_weight(model, key, p)
            if patched is not None:
                p.copy_(patched)
    for sub in mod.modules():  # lowvram weight patches belong to the model, not the head
        for attr in ("weight_function", "bias_function"):
            if hasattr(sub, attr):
                setattr(sub, attr, [])
    return mod.requires_grad_(False)


def _string_to_seed():
    """ComfyUI's seed for stochastic rounding: comfy.utils.string_to_seed in newer ComfyUI, where the
    comfy.model_patcher name is a shim that warns on every call (docs/compat.md); 0.3.64 has only the latter."""
    import comfy.utils

    found = getattr(comfy.utils, "string_to_seed", None)
    if found is None:
        from comfy.model_patcher import string_to_seed as found
    return found


def _patched_weight(model: Any, key: str, weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` with this MODEL's patches for ``key`` (None if it has none), computed as
    ModelPatcher.patch_weight_to_device does: in float32, then rounded to the weight's dtype with the
    key's seed."""
    patches = getattr(model, "patches", {}).get(key)
    if not patches:
        return None
    import comfy.float
    import comfy.lora
    string_to_seed = _string_to_seed()

    out = comfy.lora.calculate_weight(patches, weight.to(torch.float32, copy=True), key)
    return comfy.float.stochastic_rounding(out, weight.dtype, seed=string_to_seed(key))


def new_head(model: Any, head_type: str, node: str = "SupercondNewHead") -> core_heads.SecondHead:
    """A fresh head: copies of the model's tail (with its LoRA patches), so it predicts the conditional
    output (delta 0)."""
    spec = model_spec(model, head_type, node)
    tail = fm.family_of(model, node).tail
    finals = [_base_copy(model, path) for path in tail.final]
    final = finals[0] if len(finals) == 1 else core_heads.Chain(finals)
    block = _base_copy(model, tail.block) if head_type == "last_block" else None
    return core_heads.SecondHead(spec, final, block)


def head_from_file(model: Any, path: str, name: str | None = None,
                   node: str = "SupercondLoadHead") -> core_heads.SecondHead:
    name = name or str(path)
    spec, tensors = core_heads.read_head_file(path)
    want = model_spec(model, spec.head_type, node)
    misfit = spec.misfit(want)
    if misfit:
        raise InputError(f"head {name} does not fit this model ({want.family}, {want.prediction}): {misfit}")
    head = core_heads.load_state(new_head(model, spec.head_type, node), tensors, where=name)
    head.spec = dataclasses.replace(head.spec, reads_negative=spec.reads_negative)
    return head


def attach_head(model: Any, head: core_heads.SecondHead) -> Any:
    m = model.clone()
    m.set_attachments(ATTACHMENT, head)
    return m


def head_of(model: Any) -> core_heads.SecondHead | None:
    return model.get_attachment(ATTACHMENT)


@dataclass
class Capture:
    """What one diffusion-model call saw: its inputs and those of the head's capture points."""

    net_args: tuple = ()
    net_kwargs: dict = field(default_factory=dict)
    final_args: tuple = ()
    final_kwargs: dict = field(default_factory=dict)
    block_args: tuple = ()
    block_kwargs: dict = field(default_factory=dict)
    native_uncond: torch.Tensor | None = None
    negative_context: torch.Tensor | None = None  # a negative-reading head's context (the negative's tokens)

    @property
    def x(self) -> torch.Tensor:
        return self.net_args[0]

    def hook(self, slot: str, copy: bool = False):
        """A forward pre-hook recording the module's inputs. ``copy``: keep copies of the tensors, for a
        module that updates its input in place (Flux and Chroma single blocks do ``x += ...``)."""
        def pre(_module, args, kwargs):
            if copy:
                args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            setattr(self, f"{slot}_args", args)
            setattr(self, f"{slot}_kwargs", kwargs)
        return pre


@contextmanager
def capturing(net: nn.Module, tail: fm.Tail | None, final: bool, block: bool) -> Iterator[Capture]:
    """Record the inputs of ``net`` (and of its final projection / last block entry) for the calls
    made inside the block; the hooks never outlive it."""
    cap = Capture()
    handles = [net.register_forward_pre_hook(cap.hook("net"), with_kwargs=True)]
    try:
        if final:
            handles.append(fm.resolve(net, tail.final[0])[0].register_forward_pre_hook(cap.hook("final"),
                                                                                      with_kwargs=True))
        if block:
            handles.append(fm.resolve(net, tail.block_entry)[0].register_forward_pre_hook(cap.hook("block", copy=True),
                                                                                        with_kwargs=True))
        yield cap
    finally:
        for h in handles:
            h.remove()


def run_head(head: core_heads.SecondHead, tail: fm.Tail, net: nn.Module, cap: Capture) -> torch.Tensor:
    """The head's prediction in the diffusion model's raw output space (eps, v or flow)."""
    predict = getattr(head, "predict_raw", None)
    if predict is not None:  # a head that computes the raw output itself (the tests' oracle)
        return predict(cap)
    fargs, fkw = cap.final_args, cap.final_kwargs
    if head.block is not None:
        if tail.layout == "unet":
            from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed

            h, emb = cap.block_args[:2]
            kw = cap.net_kwargs
            context = kw.get("context") if cap.negative_context is None else cap.negative_context
            h = forward_timestep_embed(head.block, h, emb, context, kw.get("transformer_options", {}),
                                       None, time_context=kw.get("time_context"),
                                       num_video_frames=kw.get("num_video_frames"),
                                       image_only_indicator=kw.get("image_only_indicator"))
            fargs = (h.type(cap.x.dtype),)
        else:
            bkw = cap.block_kwargs if cap.negative_context is None else {**cap.block_kwargs,
                                                                         "context": cap.negative_context}
            out = head.block(*cap.block_args, **bkw)
            fargs = (fm.block_tokens(tail, out, cap.final_args[0].shape[1]), *cap.final_args[1:])
    return fm.to_output(tail, net, head.final(*fargs, **fkw), cap.x)


@dataclass(frozen=True)
class SinglePassConfig:
    real_cfg_steps: int = 0
    negative: str = "head"   # "head": the head stands in for the negative; "real_cfg": two passes


@dataclass
class RunState:
    """One sampling run's side channel (an object: it survives ComfyUI's per-call dict copies)."""

    config: SinglePassConfig
    sample_sigmas: torch.Tensor
    head: core_heads.SecondHead | None
    tail: fm.Tail
    native: bool
    latent_channels: int
    active: bool = False
    filed: dict = field(default_factory=dict)
    head_steps: int = 0
    two_pass_steps: int = 0
    cached_steps: int = 0  # head steps whose model call a cache (EasyCache) skipped
    head_diffs: dict = field(default_factory=dict)  # per cond uuid: the head's last output minus its input
    negative_tokens: torch.Tensor | None = None  # the wired negative's tokens, for a negative-reading head
    warned: set = field(default_factory=set)

    def remember(self, uuids: list, raw: torch.Tensor, net_input: torch.Tensor) -> None:
        """Keep the head's output as a difference to the model's input, per cond, as EasyCache keeps the
        model's: a step the cache skips reuses it."""
        diff = raw.float() - net_input[:, :self.latent_channels].float()
        for uid, chunk in zip(uuids, diff.chunk(len(uuids)), strict=True):
            self.head_diffs[uid] = chunk

    def recall(self, uuids: list, net_input: torch.Tensor) -> torch.Tensor:
        """The head's output on a step whose model call a cache skipped: this input plus the last difference."""
        if any(uid not in self.head_diffs for uid in uuids):
            raise InputError("single-pass: a cache skipped the model call before the head had run once for this "
                             "conditioning; start the cache later (its start_percent)")
        self.cached_steps += 1
        x = net_input[:, :self.latent_channels].float()
        return torch.cat([xc + self.head_diffs[uid] for uid, xc in zip(uuids, x.chunk(len(uuids)), strict=True)])

    def warn_once(self, what: str, message: str, level: int = logging.WARNING) -> None:
        if what not in self.warned:
            self.warned.add(what)
            log.log(level, message)


class SinglePassHook:
    def __init__(self, config: SinglePassConfig) -> None:
        self.config = config

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        mp = guider.model_patcher
        head, native = head_of(mp), native_two_head(mp)
        if head is None and not native:
            raise InputError("no single-pass head on this MODEL: put SupercondNewHead or SupercondLoadHead "
                            "before SupercondSinglePass (or load a checkpoint trained with doubled output channels)")
        fam = fm.family_of(mp, NODE)
        for name in ("positive", "negative"):
            fm.check_conditioning(fam, guider.conds.get(name) or [], NODE, f"{name} conditioning")
        bm = mp.model
        run = RunState(self.config, sigmas.detach().float().cpu(), head, fam.tail, native,
                       bm.latent_format.latent_channels)
        if head is not None:
            head.to(mp.load_device)
        to = guider.model_options.setdefault("transformer_options", {})
        previous = to.get(KEY)
        to[KEY] = run
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            if head is not None:
                head.to(mp.offload_device)
            if previous is None:
                to.pop(KEY, None)
            else:
                to[KEY] = previous
            log.info("single-pass: %d model evaluations from one pass (%d of them answered by a cache), %d with "
                     "true two-pass CFG", run.head_steps, run.cached_steps, run.two_pass_steps)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run: RunState | None = model_options.get("transformer_options", {}).get(KEY)
        if run is None or len(conds) != 2 or conds[1] is None:
            return executor(model, conds, x_in, timestep, model_options)  # cfg 1, 3-branch guiders, no run
        if self.config.negative == "real_cfg" or \
                step_index(run.sample_sigmas, float(timestep.flatten()[0])) < self.config.real_cfg_steps:
            run.two_pass_steps += 1
            return executor(model, conds, x_in, timestep, model_options)
        if any("default" in e for e in conds[0]):
            run.warn_once("default", "single-pass: hook-scheduled default conditioning is not supported by the "
                          "head; these steps run true two-pass CFG")
            run.two_pass_steps += 1
            return executor(model, conds, x_in, timestep, model_options)
        run.negative_tokens = self._negative_tokens(run, conds[1])
        run.active, run.filed = True, {}
        try:
            out = list(executor(model, [conds[0], None], x_in, timestep, model_options))
        finally:
            run.active = False
        out[1] = self._uncond(run, conds[0], x_in, timestep)
        run.head_steps += 1
        return out

    @staticmethod
    def _negative_tokens(run: RunState, entries: list[dict]) -> torch.Tensor | None:
        """The wired negative's tokens when the head reads negatives, else None (and the log says the
        negative is not evaluated)."""
        if run.head is None or not run.head.spec.reads_negative:
            if entries:
                run.warn_once("empty-only", "single-pass: this head predicts the empty prompt's output; the wired "
                              "negative prompt is not evaluated (a head trained with negative_prompts reads it)",
                              logging.INFO)
            return None
        if len(entries) > 1:
            run.warn_once("negatives", "single-pass: several negative entries (areas, masks or combined prompts): "
                          "the head reads the first one's prompt")
        crossattn = entries[0].get("model_conds", {}).get("c_crossattn")
        return crossattn.cond if crossattn is not None else entries[0]["cross_attn"]

    @staticmethod
    def _uncond(run: RunState, entries: list[dict], x_in: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        import comfy.samplers

        parts = []
        for entry in entries:
            p = comfy.samplers.get_area_and_mult(entry, x_in, timestep)
            if p is None:
                continue
            chunk = run.filed.pop(p.uuid, None)
            if chunk is None:
                raise InputError("single-pass: the head produced no prediction for a conditioning entry (another "
                                "node changed how ComfyUI batches the model call)")
            parts.append((chunk, p.mult, p.area))
        return blend(x_in, parts)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        run: RunState | None = to.get(KEY)
        if run is None or not (run.native or run.active):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        base = executor.class_obj
        net = base.diffusion_model
        with capturing(net, run.tail, final=not run.native,
                       block=not run.native and run.head.block is not None) as cap:
            split_handle = None
            if run.native:
                def split(_module, _args, out):
                    cond, cap.native_uncond = split_doubled(out, run.latent_channels)
                    return cond
                split_handle = net.register_forward_hook(split)
            try:
                denoised = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            finally:
                if split_handle is not None:
                    split_handle.remove()
        if run.active:
            uuids = to.get("uuids") or []
            if run.native:
                raw = cap.native_uncond
            elif cap.final_args:
                if run.negative_tokens is not None:
                    ctx = cap.net_kwargs.get("context")
                    tokens = run.negative_tokens.to(cap.x.device, ctx.dtype if ctx is not None else cap.x.dtype)
                    context, n = fm.block_context(run.tail, net, tokens), cap.x.shape[0]
                    cap.negative_context = context if context.shape[0] == n else context[:1].expand(n, -1, -1)
                raw = run_head(run.head, run.tail, net, cap)
                run.remember(uuids, raw, cap.x)
            else:  # a cache (EasyCache) answered inside the model's forward: the head's output is cached alike
                raw = run.recall(uuids, base.model_sampling.calculate_input(t, x))
            uncond = base.model_sampling.calculate_denoised(t, raw.float(), x)
            for uid, chunk in zip(uuids, uncond.chunk(len(uuids)), strict=True):
                run.filed[uid] = chunk
        return denoised


def installed_config(model: Any) -> SinglePassConfig | None:
    import comfy.patcher_extension as pe

    for w in model.get_wrappers(pe.WrappersMP.CALC_COND_BATCH, KEY):
        if isinstance(getattr(w, "__self__", None), SinglePassHook):
            return w.__self__.config
    return None


def patch_model(model: Any, config: SinglePassConfig) -> Any:
    """A clone of ``model`` serving the unconditional prediction from its head (replaces an earlier patch)."""
    import comfy.patcher_extension as pe

    if not hasattr(model, "add_wrapper_with_key"):
        raise InputError(f"expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")
    if config.negative not in NEGATIVE_MODES:
        raise InputError(f"negative must be one of {list(NEGATIVE_MODES)}, got {config.negative!r}")
    fm.family_of(model, NODE)
    if head_of(model) is None and not native_two_head(model):
        raise InputError("this MODEL has no single-pass head: connect it through SupercondNewHead or "
                        "SupercondLoadHead first (a checkpoint with doubled output channels needs none)")
    m = model.clone()
    hook = SinglePassHook(config)
    for kind, fn in ((pe.WrappersMP.OUTER_SAMPLE, hook.outer_sample),
                     (pe.WrappersMP.CALC_COND_BATCH, hook.calc_cond_batch),
                     (pe.WrappersMP.APPLY_MODEL, hook.apply_model)):
        m.remove_wrappers_with_key(kind, KEY)
        m.add_wrapper_with_key(kind, KEY, fn)
    return m
