"""SupercondTrainHead: trains the second (unconditional) head of single-pass sampling, by distillation
from the frozen model or with the gist's rolled-caption objective (core/head_train.py), with the
trainer's progress bar, Cancel, live loss chart, atomic checkpoints and resume (nodes/train_run.py).

The head is a separate module fed with features captured from the model's own forward pass. In
distill mode (and gist with lora_rank 0) the backbone is never changed, so the conditional path stays
bit-identical. In gist mode with lora_rank > 0 the conditional output is trained too, as in seed 003:
a LoRA on the whole diffusion model (SupercondTrainLoRA's layers and kohya names) learns jointly with
the head, is saved as a kohya file under ``loras`` and applied to the output MODEL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from comfy_api.v0_0_2 import io, ui

from ...core import head_objective as ho
from ...core import heads as core_heads
from ...core.files import save_atomic, torch_save_atomic
from ...core.head_train import HeadTrainConfig, HeadTrainer, TrajectoryPool, merged_state
from ...core.lora import LoRANetwork, kohya_metadata
from ...core.seeds import seeded_generator
from ...core.train import batch_cond
from .. import events
from .. import family as fm
from ..checked import CheckedNode
from ..errors import InputError
from ..inputs import MAX_SEED, float_input, int_input
from ..plots import line_plot
from ..singlepass import hook
from ..singlepass.nodes import CATEGORY, FOLDER
from . import distributed, ranks, sharding
from . import model as tm
from . import run as train_run
from .lora_run import conds_from

log = logging.getLogger("supercond")
NODE = "SupercondTrainHead"
BATCH = 4           # samples per step (chains in the trajectory pool when no LATENT sets it)
TRAJ_STEPS = 10     # Euler steps of one teacher trajectory, from pure noise down to the last sigma
TRAJ_LATENT = 32    # latent side of the trajectories when no LATENT sets it (256 px on 8x VAEs)
_HEAD_LORA_SEED, _MODEL_LORA_SEED = 0x4EAD, 0xBA5E  # streams of the LoRA inits (head's, model's)


def conditioning_rows(value: Any, name: str) -> tuple[list[dict], dict | None]:
    """Per-prompt cond rows of a CONDITIONING input (and SupercondLoadDataset's empty prompt), or a clear error."""
    ok = isinstance(value, list) and value and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor) and isinstance(e[1], dict)
        for e in value)
    if not ok:
        raise InputError(f"{name} is not a CONDITIONING (a list of [embedding, options] pairs, e.g. from "
                             f"CLIPTextEncode); got {type(value).__name__}. Connect a CONDITIONING output to {name}")
    try:
        return conds_from(value)
    except InputError as e:
        raise InputError(f"{name}: {e}") from None


def _take(obj: Any, rows: int | None, total: int, detach: bool = True) -> Any:
    """Features for the head: batch rows [:rows] of every tensor with ``total`` rows, floats as float32
    (the head trains in float32 whatever the model's dtype); detached unless the backbone trains too."""
    if isinstance(obj, torch.Tensor):
        if rows is not None and obj.dim() > 0 and obj.shape[0] == total:
            obj = obj[:rows]
        if detach:
            obj = obj.detach()
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_take(o, rows, total, detach) for o in obj)
    if isinstance(obj, list):
        return [_take(o, rows, total, detach) for o in obj]
    if isinstance(obj, dict):
        return {k: _take(v, rows, total, detach) for k, v in obj.items()}
    return obj


Features = list[tuple[list[int], hook.Capture]]  # batch rows, and what the one model call serving them saw


class Teacher:
    """The model through its ``apply_model`` (patches and transformer_options included), called as the
    sampler batches prompts, with the head's capture points hooked for each call (the hooks never
    outlive it). ``trains_backbone``: the features keep their graph, so the head's loss reaches a LoRA
    on the model (gist)."""

    def __init__(self, mp: Any, device: torch.device, head_type: str, positive: list[dict], negatives: list[dict],
                 trains_backbone: bool = False, reads_negative: bool = False):
        self.call = fm.ModelCall(mp, device)
        self.net = mp.model.diffusion_model
        self.tail = fm.family_of(mp, NODE).tail
        self.head_type = head_type
        self.positive, self.negatives = positive, negatives
        self.trains_backbone = trains_backbone
        self.reads_negative = reads_negative  # the head's block reads each sample's negative prompt

    def _calls(self, x: torch.Tensor, sigma: torch.Tensor, rows: list[dict], first: int
               ) -> tuple[torch.Tensor, Features]:
        """x0 of every row; the features of rows ``< first`` (rows that share a call keep their order, so
        those are a prefix of each call's rows)."""
        x0s, feats, groups = [], [], []
        batches, missing = sharding.agreed_batches(self.call, x, rows)  # with a sharded base: as every rank
        for g, kwargs in batches:
            idx = torch.tensor(g, device=x.device)
            with hook.capturing(self.net, self.tail, final=True, block=self.head_type == "last_block") as cap:
                x0s.append(self.call.apply(x[idx], sigma[idx], kwargs))
            keep = [i for i in g if i < first]
            if keep:
                feats.append((keep, self.features(cap, len(keep), len(g))))
            groups.append(g)
        x0 = x0s[0] if len(groups) == 1 else fm.restore_order(torch.cat(x0s), groups)
        return sharding.with_idle_calls(x0, self.call, x, sigma, batches, missing), feats

    def features(self, cap: hook.Capture, rows: int | None, total: int) -> hook.Capture:
        return hook.Capture(*(_take(getattr(cap, f), rows, total, not self.trains_backbone) for f in
                              ("net_args", "net_kwargs", "final_args", "final_kwargs", "block_args", "block_kwargs")))

    def teach(self, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor, negative: torch.Tensor):
        """[positive rows, negative rows] in as few calls as the sampler would make (cond first, as
        ComfyUI batches CFG), each sample with its own negative prompt; the features are the positive
        rows', with the sample's negative as the block reads it when the head reads negatives."""
        b = x.shape[0]
        negs = [self.negatives[int(i)] for i in negative]
        x0, feats = self._calls(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                [self.positive[int(i)] for i in prompt] + negs, b)
        if self.reads_negative:
            for keep, cap in feats:
                tokens = batch_cond([{"cross_attn": negs[i]["cross_attn"]} for i in keep])["cross_attn"].to(x.device)
                with torch.no_grad():
                    cap.negative_context = fm.block_context(self.tail, self.net, tokens).float()
        return x0[:b], x0[b:], feats

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, captions: torch.Tensor):
        return self._calls(x, sigma, [self.positive[int(i)] for i in captions], x.shape[0])


def head_denoiser(head: core_heads.SecondHead, teacher: Teacher, model_sampling: Any):
    """(features, x, sigma) -> the head's unconditional denoised prediction (with grad)."""
    def run(feats: Features, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raws = [hook.run_head(head, teacher.tail, teacher.net, cap) for _, cap in feats]
        raw = raws[0] if len(raws) == 1 else fm.restore_order(torch.cat(raws), [k for k, _ in feats])
        return model_sampling.calculate_denoised(sigma, raw.float(), x.float())
    return run


def starting_head(model: Any, head_type: str) -> core_heads.SecondHead:
    """The MODEL's own head (SupercondNewHead / SupercondLoadHead) if it has one, else a fresh one."""
    fresh = hook.new_head(model, head_type, NODE)
    have = hook.head_of(model)
    if have is None:
        return fresh
    if have.spec.head_type != head_type:
        raise InputError(f"the MODEL already carries a {have.spec.head_type} head (from SupercondNewHead or "
                             f"SupercondLoadHead) but head is {head_type!r}: set head to {have.spec.head_type!r}, "
                             "or connect the MODEL without that node")
    return core_heads.load_state(fresh, core_heads.head_state(have), where="the MODEL's head")


def gist_captions(rows: list[dict], n: int) -> torch.Tensor:
    """Per latent, the index of the first row with its caption (equal captions share one), so a swapped
    caption is drawn by the captions' frequency; refuses a dataset with nothing to swap."""
    firsts: list[int] = []  # the first row of each distinct caption
    ids: list[int] = []
    for i, r in enumerate(rows):
        same = next((j for j in firsts if rows[j]["cross_attn"].shape == r["cross_attn"].shape
                     and torch.equal(rows[j]["cross_attn"], r["cross_attn"])), None)
        if same is None:
            firsts.append(i)
        ids.append(i if same is None else same)
    if len(set(ids)) < 2:
        raise InputError(f"gist mode needs at least 2 different captions to swap ({n} latents, {len(set(ids))} "
                         "distinct captions). Give latents with different captions (e.g. SupercondLoadDataset), "
                         "or use mode distill")
    if len(rows) != n:
        raise InputError(f"gist mode needs one caption per latent: {n} latents but {len(rows)} conditionings")
    return torch.tensor(ids)


def check_reads_text(model: Any, head_type: str) -> None:
    """A negative-reading head needs a copied last block that attends to the prompt."""
    fam = fm.family_of(model, NODE)
    if head_type != "last_block" or not fm.block_reads_text(fam.tail, fm.resolve(model.model.diffusion_model,
                                                                                 fam.tail.block)[0]):
        raise InputError(f"negative_prompts need a head that reads the prompt: head last_block on a model whose "
                         f"last block attends to the text (SD1.x, Wan); this is a {head_type} head on {fam.label}. "
                         "Clear negative_prompts for a head of the empty prompt")


def encode_negatives(text: str, clip: Any, mode: str, head_type: str, model: Any) -> list[dict]:
    """negative_prompts (one per line) and the empty prompt as conditioning rows, or [] when there are none."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return []
    if mode != "distill":
        raise InputError("negative_prompts are for distill mode (the teacher's two-pass CFG draws them); clear them "
                         "for gist")
    check_reads_text(model, head_type)
    if clip is None:
        raise InputError("negative_prompts need the clip input to be encoded: connect the model's CLIP")
    rows = []
    for line in [*lines, ""]:
        rows += conditioning_rows(clip.encode_from_tokens_scheduled(clip.tokenize(line)), "negative_prompts")[0]
    log.info("supercond: the head learns to read %d negative prompts (and the empty prompt and the wired negative)",
             len(lines))
    return rows


class SupercondTrainHead(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondTrainHead",
            display_name="Train Single-Pass Head",
            category=CATEGORY,
            description=("Trains the second (unconditional) head that SupercondSinglePass uses, so CFG costs one "
                         "model call per step. distill: the frozen model teaches the head its prediction for the "
                         "negative (empty) prompt on its own CFG trajectories, no images needed. gist: seed 003's "
                         "swapped captions on a LATENT dataset. distill never changes the model; gist with lora_rank "
                         "> 0 trains a LoRA on it too (saved under models/loras). Saves head files under "
                         f"models/{FOLDER} (load them later with SupercondLoadHead)."),
            inputs=[
                io.Model.Input("model", tooltip="The model to give a head. If it already carries one (New/Load Head), "
                                                "training continues from that head."),
                io.Conditioning.Input("positive", tooltip="Prompts to train on (several prompts are fine: "
                                      "Conditioning Combine, or one per latent for gist)."),
                io.Combo.Input("mode", options=["distill", "gist"], default="distill",
                               tooltip="distill: learn the frozen model's prediction for `negative` from the same "
                                       "pass's features (any checkpoint, no images; the model is not changed). "
                                       "gist (seed 003): needs a LATENT with one caption per latent; rolled_fraction "
                                       "of the samples get a caption drawn from the dataset's and teach the head, the others teach the "
                                       "model's own (conditional) output. That part needs lora_rank > 0 (a LoRA on "
                                       "the model); with lora_rank 0 the model stays frozen and only the head "
                                       "learns."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="distill: the prompt whose prediction the head learns, normally an EMPTY "
                                              "prompt (CLIPTextEncode of ''). Not connected: the empty prompt "
                                              "SupercondLoadDataset attaches. Unused in gist mode."),
                io.Latent.Input("latent", optional=True,
                                tooltip="distill: training images (noised at random sigmas); an empty latent "
                                        "(EmptyLatentImage) only sets the size and number of the model's own "
                                        f"trajectories; not connected: trajectories at {TRAJ_LATENT * 8} px. "
                                        "gist: required, one caption per latent."),
                int_input("steps", 300, 1, 1_000_000, "Total optimizer steps (with resume: the total to reach)."),
                float_input("learning_rate", 1e-4, 1e-8, 1.0, 1e-6, "AdamW learning rate of the head (or its LoRA) and, in "
                   "gist with lora_rank > 0, of the model's LoRA; decayed to 0 by steps (cosine). The head starts "
                   "at the model's own weights: 1e-4 suits projection and LoRAs; last_block with lora_rank 0 wants "
                   "~1e-6."),
                io.Combo.Input("head", options=list(core_heads.HEAD_TYPES), default="projection",
                               tooltip="projection: a copy of the final projection (tiny, ~free). last_block: a "
                                       "copy of the last block and the projection (stronger, costs one block per "
                                       "step). Must match the head the MODEL already carries, if any."),
                int_input("lora_rank", 0, 0, 256, "distill: 0 trains the head's weights directly; >0 trains a LoRA of this "
                   "rank inside the head's copy only, merged into the head when saved (same file format); the "
                   "model's own output stays bit-identical. gist: 0 keeps the model frozen (head only); >0 also "
                   "trains a LoRA of this rank (alpha = rank) on the whole model, jointly with the head, saved as "
                   "models/loras/<prefix>_<step>.safetensors: to use it later, load it with the stock LoraLoader, "
                   "then SupercondLoadHead the head."),
                float_input("cfg_min", 3.0, 1.0, 100.0, 0.1, "Lowest guidance scale the head is trained for: the loss "
                   "weights errors by (s-1)^2 for s drawn in [cfg_min, cfg_max]."),
                float_input("cfg_max", 9.0, 1.0, 100.0, 0.1, "Highest guidance scale the head is trained for (>= cfg_min)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="Seed of every random draw; same seed and inputs, same head."),
                int_input("save_every", 0, 0, 1_000_000, "Save a checkpoint every N steps (0: only at the end)."),
                io.String.Input("filename_prefix", default="supercond/head",
                                tooltip=f"Head files go to models/{FOLDER}/<prefix>_<step>.safetensors (+ "
                                        ".state.pt for resume); gist with lora_rank > 0 also writes the model's LoRA "
                                        "to models/loras/<prefix>_<step>.safetensors."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the last checkpoint of this prefix, optimizer state "
                                         "included, up to steps."),
                io.Int.Input("batch_size", default=BATCH, min=1, max=4096, optional=True,
                             tooltip="Samples per step (per process when processes is above 1). distill: "
                                     "trajectories per step when no LATENT sets their number (a LATENT's batch is "
                                     "the whole run's). gist: latents per step (at most the dataset's size); only the "
                                     "rolled_fraction share teaches the head, so at 4 and 0.1 two steps in three "
                                     "teach it nothing: the log says how many samples taught the head. The gist "
                                     "was published at batch 256."),
                io.Float.Input("rolled_fraction", default=ho.GIST_FRACTION, min=0.01, max=0.9, step=0.01,
                               optional=True,
                               tooltip="gist: the share of samples whose caption is swapped for one drawn from the "
                                       "dataset's captions (independent of the image, its own included); those "
                                       "samples teach the head the unconditional prediction, the rest the "
                                       "conditional one. Unused in distill mode."),
                io.String.Input("negative_prompts", default="", multiline=True, optional=True,
                                tooltip="distill with a last_block head on a model whose last block reads the prompt "
                                        "(SD1.x, Wan): negative prompts, one per line. The teacher runs two-pass "
                                        "CFG with a negative drawn per trajectory from these, the empty prompt and "
                                        "the wired negative, and the head learns to read the negative's tokens: "
                                        "SupercondSinglePass then feeds it the negative you wire, still at one "
                                        "model call per step. Needs clip. Empty: a head for the empty prompt."),
                io.Clip.Input("clip", optional=True, tooltip="Encodes negative_prompts (the model's own text encoder)."),
                ranks.processes_input(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained head attached (in gist "
                                "with lora_rank > 0 also with the trained LoRA, as LoraLoader applies it): "
                                "connect it to SupercondSinglePass."),
                io.String.Output(display_name="head_path", tooltip="The saved head file (the log names a gist "
                                 "LoRA's file)."),
                io.Image.Output(display_name="loss_plot", tooltip="Loss per step."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def relations(cls, cfg_min=None, cfg_max=None, **_) -> str | None:
        # Linked (not widget) values are not known at queue time; execute() checks them.
        if cfg_min is not None and cfg_max is not None and cfg_min > cfg_max:
            return f"cfg_min ({cfg_min}) must not be larger than cfg_max ({cfg_max})"
        return None

    @classmethod
    def execute(cls, model, positive, mode, steps, learning_rate, head, lora_rank, cfg_min, cfg_max, seed,
                save_every, filename_prefix, resume, negative=None, latent=None, batch_size=BATCH,
                rolled_fraction=ho.GIST_FRACTION, negative_prompts="", clip=None, processes=1) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils
        import folder_paths

        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        cfg = HeadTrainConfig(mode, steps, learning_rate, cfg_min, cfg_max, seed, batch_size,
                              tm.auto_prediction(model, "auto", NODE), rolled_fraction=rolled_fraction)
        try:
            cfg.validate()
        except ho.HeadTrainError as e:
            raise InputError(str(e)) from None
        if head not in core_heads.HEAD_TYPES:
            raise InputError(f"head must be one of {list(core_heads.HEAD_TYPES)}, got {head!r}")
        if lora_rank < 0:
            raise InputError(f"lora_rank must be >= 0, got {lora_rank}")
        stem = train_run.prefix_path(folder_paths.get_folder_paths(FOLDER)[0], filename_prefix, FOLDER)
        train_run.check_writable(stem.parent, "head files")
        lora_stem = None
        if mode == "gist" and lora_rank > 0:  # the model's LoRA goes where LoraLoader finds it
            lora_stem = train_run.prefix_path(folder_paths.get_folder_paths("loras")[0], filename_prefix, "loras")
            train_run.check_writable(lora_stem.parent, "LoRA files")
        more = encode_negatives(negative_prompts, clip, mode, head, model)
        if processes > 1 and not ranks.in_rank():
            done = ranks.run(cls.hidden.prompt, node_id, processes, NODE, stem.parent)
            path, losses = done["path"], done["losses"]
            sd = comfy.utils.load_torch_file(path, safe_load=True)
            lora = (Path(done["lora"]), comfy.utils.load_torch_file(done["lora"], safe_load=True)) \
                if done.get("lora") else None
        else:
            with train_run.memory_guard(NODE, "lower batch_size (or the LATENT's batch and size), or lora_rank"):
                path, losses, sd, lora = train(model, positive, negative, latent, cfg, head, lora_rank, stem,
                                               save_every, resume, node_id, lora_stem, more)
            if ranks.in_rank() and distributed.writes():
                events.trained({"path": str(path), "losses": losses, "lora": str(lora[0]) if lora else None})
        plot = line_plot([(f"{mode} loss", range(1, len(losses) + 1), losses)], "head training loss", "step",
                         "loss", logy=True)
        if ranks.in_rank():  # scripts/train runs the graph up to this node: nothing reads a rank's MODEL
            return io.NodeOutput(model, str(path), plot)  # (and with --shard-base, its base is sharded)
        final = hook.new_head(model, head, NODE)
        core_heads.load_state(final, sd, where=Path(path).name)
        final.spec = dataclasses.replace(final.spec, reads_negative=bool(more))
        trained = model
        if lora is not None:
            trained, _ = comfy.sd.load_lora_for_models(model, None, lora[1], 1.0, 0.0)
            log.info("supercond: the model's gist LoRA is %s: load it with LoraLoader before SupercondLoadHead "
                     "(head %s)", lora[0], path)
        return io.NodeOutput(hook.attach_head(trained, final), str(path), plot, ui=ui.PreviewImage(plot, cls=cls))


def _pool_or_latents(mp: Any, latent: dict | None, n_prompts: int, cfg: HeadTrainConfig, device: torch.device,
                     n_negatives: int = 1):
    """distill data: (trajectory pool, None) or (None, latents). An all-zero LATENT (EmptyLatentImage) sets
    the pool's size and chain count instead of being noised as if it were images."""
    import comfy.sample
    import comfy.samplers

    ms = mp.get_model_object("model_sampling")
    if latent is not None and bool(latent["samples"].abs().amax() > 0):
        return None, fm.latent_in(mp, latent["samples"])
    samples = torch.zeros(cfg.batch_size, 4, TRAJ_LATENT, TRAJ_LATENT) if latent is None else latent["samples"]
    # the sampler's own fix: the family's channel count, Qwen-Image and Wan latents 5-D
    samples = comfy.sample.fix_empty_latent_channels(mp, samples)
    n, shape = samples.shape[0], tuple(samples.shape[1:])
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", TRAJ_STEPS).float().cpu()
    s0 = sigmas[:1].to(device)

    def start(noise: torch.Tensor) -> torch.Tensor:
        n1 = noise.unsqueeze(0)
        return ms.noise_scaling(s0, n1, torch.zeros_like(n1), max_denoise=True)[0]

    return TrajectoryPool(sigmas, n, shape, start, n_prompts, cfg.cfg_min, cfg.cfg_max, cfg.seed, device,
                          n_negatives), None


_Saved = tuple[Path, dict[str, torch.Tensor], tuple[Path, dict[str, torch.Tensor]] | None]  # head, its tensors, LoRA


def train(model: Any, positive: Any, negative: Any, latent: dict | None, cfg: HeadTrainConfig, head_type: str,
          lora_rank: int, stem: Path, save_every: int, resume: bool, node_id: str | None = None,
          lora_stem: Path | None = None, more_negatives: list[dict] | None = None
          ) -> tuple[Path, list[float], dict[str, torch.Tensor], tuple[Path, dict[str, torch.Tensor]] | None]:
    """The training run; returns (saved head file, losses, the saved head tensors, and in gist mode with
    lora_rank > 0 (saved kohya LoRA file of the model, its tensors), else None). ``lora_stem`` is where
    that LoRA goes (required then). ``more_negatives``: rows of further negative prompts (distill): the
    head then learns to read each sample's negative."""
    import comfy.model_management as mm

    distributed.inputs_ready()
    rank, world = distributed.shard()
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * world)  # batch_size is per process
    model_lora = cfg.mode == "gist" and lora_rank > 0
    if model_lora and lora_stem is None:
        raise InputError("gist mode with lora_rank > 0 saves a LoRA of the model: give it a place (lora_stem)")

    fam = fm.family_of(model, NODE)
    pos_rows, empty = conditioning_rows(positive, "positive")
    fm.check_conditioning(fam, positive, NODE, "positive conditioning")
    neg_row = None
    if cfg.mode == "distill":
        if negative is not None:
            conditioning_rows(negative, "negative")
            fm.check_conditioning(fam, negative, NODE, "negative conditioning")
        neg_rows = conditioning_rows(negative, "negative")[0] if negative is not None else [empty] if empty else []
        if not neg_rows:
            raise InputError("distill mode needs the conditioning whose prediction the head learns: connect a "
                                 "CLIPTextEncode of an empty prompt ('') to negative")
        if len(neg_rows) > 1:
            raise InputError(f"negative holds {len(neg_rows)} prompts; the head learns one: connect a single "
                                 "CLIPTextEncode (an empty prompt)")
        neg_row = neg_rows[0]
    negatives = [neg_row, *(more_negatives or [])] if neg_row is not None else []
    reads = len(negatives) > 1  # encode_negatives checked that this head can read them
    captions = None
    if cfg.mode == "gist":
        if latent is None:
            raise InputError("gist mode trains on images: connect a LATENT (e.g. SupercondLoadDataset) with one "
                                 "caption per latent")
        n = latent["samples"].shape[0]
        captions = gist_captions(pos_rows, n)
        if cfg.batch_size > n:
            log.info("supercond: gist batch_size %d is more than the %d latents: using %d", cfg.batch_size, n, n)
            cfg.batch_size = n
    start = starting_head(model, head_type)
    mp = model.clone()
    sharded = sharding.requested()
    if sharded and reads and fam.tail.layout == "wan":  # its negatives go through a sharded text embedding
        raise InputError("--shard-base cannot train a Wan head that reads negative prompts (negative_prompts): "
                         "leave --shard-base out, or negative_prompts empty")
    with torch.inference_mode(False), torch.enable_grad(), contextlib.ExitStack() as shared:
        sharding.load(mp)
        device = mp.load_device
        ms = mp.get_model_object("model_sampling")
        teacher = Teacher(mp, device, head_type, pos_rows, negatives, trains_backbone=model_lora,
                          reads_negative=reads)
        net = hook.new_head(mp, head_type, NODE)  # before any LoRA hook exists: the copy must not carry one
        tm.materialize_weights(net)  # normal (not inference) tensors that autograd can use
        core_heads.load_state(net, core_heads.head_state(start))
        net = net.float().to(device)
        net.spec = dataclasses.replace(net.spec, reads_negative=reads)
        lora = backbone = None
        if lora_rank > 0 and not model_lora:  # distill: the LoRA lives inside the head's copy only
            layers = {k: m for k, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            lora = LoRANetwork(layers, lora_rank, float(lora_rank), seeded_generator(cfg.seed, _HEAD_LORA_SEED),
                               device)
            params = list(lora.parameters())
        else:
            params = list(net.parameters())
            for p in params:
                p.requires_grad_(True)
        if model_lora:  # gist: the cond output trains through a LoRA on SupercondTrainLoRA's layers
            shared.enter_context(tm.autograd_weights(mp.model.diffusion_model))
            backbone = LoRANetwork(fm.lora_layers(mp, NODE), lora_rank, float(lora_rank),
                                   seeded_generator(cfg.seed, _MODEL_LORA_SEED), device)
        if sharded:  # after the head's copy of the model's layers
            sharding.shard_base(mp.model.diffusion_model, device, fam.inplace_residual)
        pool, latents = (None, None)
        if cfg.mode == "distill":
            pool, latents = _pool_or_latents(mp, latent, len(pos_rows), cfg, device, max(len(negatives), 1))
        else:
            latents = fm.latent_in(mp, latent["samples"])
        trainer = HeadTrainer(cfg, params, head_denoiser(net, teacher, ms), ms.sigmas, teach=teacher.teach,
                              forward=teacher.forward, latents=latents, captions=captions, n_prompts=len(pos_rows),
                              n_negatives=max(len(negatives), 1),
                              pool=pool, backbone=[] if backbone is None else list(backbone.parameters()),
                              device=device, shard=(rank, world), across=distributed.across())
        if cfg.mode == "gist" and backbone is None:
            log.info("supercond: gist mode with lora_rank 0: the model stays frozen and only the head learns (from "
                     "the ~%d%% samples with swapped captions); the conditional term is in the loss but trains "
                     "nothing", round(cfg.rolled_fraction * 100))
        elif backbone is not None:
            log.info("supercond: gist mode with lora_rank %d: a LoRA on %d layers of the model learns the "
                     "conditional output with the head", lora_rank, len(backbone.layers))
        if resume:
            _resume(mp, trainer, stem, reads)
        spec = net.spec
        training = {**cfg.as_dict(), "head": head_type, "lora_rank": lora_rank, "negative_prompts": len(negatives)}
        meta = {**spec.to_metadata(), "supercond_training": json.dumps(training, sort_keys=True)}
        base_name = tm.base_model_name(mp)

        def save() -> _Saved:  # rank 0 writes; the others hold the same weights and return the same
            saved_lora = None
            if backbone is not None:  # first: a .state.pt (written last) means every file of its step exists
                ksd = backbone.kohya_state_dict(torch.float16)
                lf = tm.checkpoint_file(lora_stem, trainer.step)
                if rank == 0:
                    save_atomic(lf, ksd, kohya_metadata(lora_rank, float(lora_rank), trainer.step, training,
                                                        base_name)
                                | {"ss_training_comment": "trained with Supercond SupercondTrainHead (gist, with "
                                                          "its single-pass head)"})
                saved_lora = (lf, ksd)
            sd = merged_state(net, lora) if lora is not None else core_heads.head_state(net)
            f = tm.checkpoint_file(stem, trainer.step)
            if rank:
                return f, sd, saved_lora
            save_atomic(f, sd, meta | {"supercond_step": str(trainer.step)})
            torch_save_atomic(tm.state_file(f), trainer.state_dict())
            return f, sd, saved_lora

        def step() -> float:
            mm.throw_exception_if_processing_interrupted()
            return trainer.train_step()

        net.train()
        hooked = lora if lora is not None else backbone  # at most one of them exists
        with hooked.attached() if hooked is not None else contextlib.nullcontext(), tm.trainable(mp, net):
            last = train_run.run_steps(step, lambda: trainer.step, cfg.steps, save, save_every, node_id,
                                       what="head training", writer=rank == 0)
        if cfg.mode == "gist":
            seen = trainer.step * cfg.batch_size
            log.info("supercond: gist: %d of %d samples (%.1f%%) taught the head (swapped captions) in %d steps "
                     "of %d; raise batch_size or steps if that is few", trainer.head_samples, seen,
                     100.0 * trainer.head_samples / max(seen, 1), trainer.step, cfg.batch_size)
        return last[0], trainer.losses, last[1], last[2]


def _resume(mp: Any, trainer: HeadTrainer, stem: Path, reads_negative: bool) -> None:
    found = tm.last_checkpoint(stem)
    if found is None:
        log.info("supercond: no head checkpoint of %s to resume; starting at step 0", stem)
        return
    state = tm.read_state(tm.state_file(found[0]))
    try:
        saved = hook.head_from_file(mp, found[0], name=found[0].name, node=NODE)  # the file must fit this model
        if saved.spec.reads_negative != reads_negative:
            raise InputError("it was trained %s negative_prompts: resume with the same negative_prompts" %
                             ("with" if saved.spec.reads_negative else "without"))
        trainer.load_state_dict(state)
    except (InputError, core_heads.HeadFileError, ho.HeadTrainError) as e:
        raise InputError(f"cannot resume from {found[0]}: {e}. Use another filename_prefix or switch resume "
                             "off") from None
    log.info("supercond: resumed %s at step %d", found[0].name, trainer.step)


NODES: list[type[io.ComfyNode]] = [SupercondTrainHead]
