"""SupercondTrainLoRA: trains a LoRA on the graph's MODEL with the core trainer, shows progress and a
live loss chart, stops on Cancel with a loadable checkpoint, saves kohya-format files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from comfy_api.v0_0_2 import io, ui

from ...core import objective, optim
from ...core.files import save_atomic, torch_save_atomic
from ...core.lora import LoRANetwork, kohya_metadata
from ...core.perturb import DISTRIBUTIONS
from ...core.seeds import seeded_generator
from ...core.train import TrainConfig, Trainer, TrainError, stored_row
from ...core.train_data import DataError, TrainData, split_validation
from .. import family as fm
from ..errors import InputError
from ..inputs import MAX_SEED, float_input, int_input
from ..plots import line_plot
from . import model as tm
from . import run as train_run
from . import text_encoder
from .previews import Previewer, default_cfg, grid, parse_prompts, row_conditioning

log = logging.getLogger("supercond")
CATEGORY = "supercond/training"
EXPORT_FORMATS = ("kohya", "diffusers")
NODE = "SupercondTrainLoRA"


def text_parts(fam: fm.Family) -> dict[str, tuple[int, ...] | None]:
    """The text parts of a training row that CEP perturbs, with the family's encoder segments."""
    parts: dict[str, tuple[int, ...] | None] = {"cross_attn": fam.token_segments}
    if fam.pooled:
        parts["pooled_output"] = fam.pooled
    return parts


def conds_from(conditioning: list, with_text: bool = False) -> tuple[list, dict | None]:
    """CONDITIONING -> one row per prompt (batch rows split): the tokens as ``cross_attn`` plus the
    extras the model's extra_conds read (pooled output, guidance, SDXL sizes, ...; fm.COND_EXTRAS), and
    the empty prompt's row that SupercondLoadDataset attaches (for caption dropout). An entry with
    SupercondLoadDataset's ``supercond_variants`` (shuffled captions) gives a list of rows, one per variant."""
    rows, empty = [], None
    for i, (tokens, extra) in enumerate(conditioning):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise InputError(f"conditioning entry {i} is not token embeddings [batch, tokens, width]")
        for b in range(tokens.shape[0]):
            row = {"cross_attn": tokens[b:b + 1]}
            for key in fm.COND_EXTRAS:
                value = extra.get(key)
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == tokens.shape[0]:
                    value = value[b:b + 1]
                if key in extra:
                    row[key] = value
            if with_text:
                if not isinstance(extra.get("supercond_text"), str) or tokens.shape[0] != 1:
                    raise InputError(f"{NODE}: text-encoder training needs the captions: use "
                                     "SupercondLoadDataset's CONDITIONING (it carries them), or set "
                                     "text_encoder_lr to 0")
                row["text"] = extra["supercond_text"]
            variants = [{k: v for k, v in var.items() if with_text or k != "text"}
                        for var in extra.get("supercond_variants") or []]
            rows.append([{**row, **v} for v in variants] if variants and tokens.shape[0] == 1 else row)
        empty = empty or extra.get("supercond_empty")
    if with_text and empty is not None:
        empty = {**empty, "text": ""}
    return rows, empty


def optimizer_input() -> io.Combo.Input:
    """The optimizer choice: only those that run on this ComfyUI's device with the installed packages."""
    import comfy.model_management as mm

    names = optim.available(mm.get_torch_device())
    missing = [n for n in optim.OPTIMIZERS if n not in names]
    tip = "; ".join(f"{n}: {optim.DESCRIPTIONS[n]}" for n in names)
    if missing:
        tip += f". Not available here: {', '.join(missing)} (see the README)"
    return io.Combo.Input("optimizer", options=names, default="adamw", optional=True, tooltip=tip + ".")


class SupercondTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondTrainLoRA",
            display_name="Train LoRA (Supercond)",
            category=CATEGORY,
            description=("Trains a LoRA on this MODEL (eps, v or flow loss; min-SNR / debiased weights; CEP, input "
                         "perturbation, offset and pyramid noise, caption dropout). Shows progress and a live loss "
                         "chart, stops on Cancel keeping a loadable checkpoint, and saves kohya-format files under "
                         "models/loras that the stock LoraLoader reads."),
            inputs=[
                io.Model.Input("model", tooltip="The model to train on (its patches are kept)."),
                io.Latent.Input("latents", tooltip="The training images as latents (VAE-encoded)."),
                io.Conditioning.Input("conditioning", tooltip="One conditioning per latent, or one for all."),
                int_input("steps", 200, 1, 1_000_000, "Total optimizer steps (with resume: the total to reach)."),
                float_input("learning_rate", 1e-4, 1e-8, 1.0, 1e-6, "Learning rate (Prodigy: 1.0, a multiplier of the step size it estimates)."),
                int_input("rank", 8, 1, 256, "LoRA rank (dimension of the low-rank update)."),
                float_input("alpha", 8.0, 0.0, 1024.0, 0.5, "LoRA alpha; the update is scaled by alpha/rank."),
                int_input("batch_size", 1, 1, 256, "Latents per micro-batch."),
                int_input("grad_accumulation", 1, 1, 1024, "Micro-batches per optimizer step (loss divided by it)."),
                io.Combo.Input("prediction", options=["auto", *objective.PREDICTIONS], default="auto",
                               tooltip="Loss target: eps, v or flow. auto reads the model's sampling type."),
                io.Combo.Input("loss_weighting", options=list(objective.WEIGHTINGS), default="none",
                               tooltip="none: plain MSE on the target. min_snr: Min-SNR-gamma. debiased: "
                                       "1/sqrt(SNR)-style (Yu et al.)."),
                float_input("min_snr_gamma", 5.0, 0.01, 100.0, 0.1, "gamma of Min-SNR weighting (5 recommended)."),
                float_input("cep_gamma", 0.0, 0.0, 100.0, 0.01, "CEP strength on the text embeddings during training; "
                   "0 = off, 1 = the paper's default. Never applied outside training."),
                io.Combo.Input("cep_distribution", options=list(DISTRIBUTIONS), default="uniform",
                               tooltip="uniform: U(-a, a) (CEP-U); gaussian: N(0, a^2) (CEP-G); a = gamma/sqrt(d)."),
                float_input("input_perturbation", 0.0, 0.0, 1.0, 0.01, "DDPM-IP gamma: extra noise on the model input only; "
                   "the target stays the original noise. 0 = off, ~0.1 typical."),
                float_input("offset_noise", 0.0, 0.0, 1.0, 0.01, "Offset noise strength (per-channel constant added to "
                   "the noise). 0 = off, 0.05-0.1 typical."),
                int_input("pyramid_iterations", 0, 0, 10, "Pyramid (multi-resolution) noise levels; 0 = off."),
                float_input("caption_dropout", 0.0, 0.0, 1.0, 0.01, "Probability of replacing a caption's conditioning "
                   "by the empty prompt's (needs SupercondLoadDataset's conditioning)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="Seed of every random draw; same seed and inputs, same LoRA."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute activations in backward: less memory, ~20-30% slower."),
                io.Combo.Input("lr_schedule", options=["constant", "cosine"], default="constant",
                               tooltip="Learning-rate schedule after warmup (cosine decays to 0 at steps)."),
                int_input("warmup_steps", 0, 0, 100_000, "Linear learning-rate warmup steps."),
                float_input("max_grad_norm", 1.0, 0.0, 1000.0, 0.1, "Gradient clipping norm; 0 = off."),
                int_input("save_every", 0, 0, 1_000_000, "Save a checkpoint every N steps (0: only at the end)."),
                io.String.Input("filename_prefix", default="supercond/lora",
                                tooltip="Files go to models/loras/<prefix>_<step>.safetensors (+ .state.pt)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the last checkpoint of this prefix, optimizer state "
                                         "included, up to steps."),
                optimizer_input(),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.0001, optional=True,
                               tooltip="EMA of the LoRA weights (0 = off; 0.999 typical for long runs, warmed up "
                                       "as diffusers does). When on, each checkpoint also writes "
                                       "<prefix>_<step>_ema.safetensors, and the MODEL and path outputs are the "
                                       "EMA's."),
                io.Int.Input("sample_every", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="Sample images from the model being trained every N steps (0 = off) and at "
                                     "the end; shown live in the node and saved beside the checkpoints as "
                                     "<prefix>_<step>_sample_<k>.png. Sampler euler, scheduler normal."),
                io.String.Input("sample_prompts", default="", multiline=True, optional=True,
                                tooltip="One prompt per line, with kohya's options: --n negative, --s steps (20), "
                                        "--l cfg (5; 1 for Flux dev), --d seed (seed + line), --w/--h size in "
                                        "pixels (the first training image's). Needs the clip input; without it "
                                        "(or when empty) the first training caption is sampled."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decodes the sample images. Without it they are a coarse latent-to-RGB "
                                     "preview (as ComfyUI's live previews)."),
                io.Int.Input("keep_last", default=0, min=0, max=100_000, optional=True,
                             tooltip="Keep only the newest N checkpoints of this prefix (their EMA files and "
                                     "states go with them; sample images stay). 0 = keep all."),
                io.Combo.Input("export_format", options=["kohya", "diffusers"], default="kohya", optional=True,
                               tooltip="kohya: lora_unet_* keys (kohya's sd-scripts, ComfyUI, A1111). diffusers: "
                                       "PEFT keys (unet.*.lora_A/lora_B) for diffusers' load_lora_weights; "
                                       "ComfyUI's LoraLoader reads both. Resume works with either."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Encodes sample_prompts. With text_encoder_lr > 0 a LoRA is trained on it "
                                      "too (SD1.x and SDXL), and the CLIP output carries it."),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1.0, step=1e-6, optional=True,
                               tooltip="Learning rate of the text-encoder LoRA (0 = the text encoder is not "
                                       "trained; kohya users often use half the UNet's)."),
                io.Float.Input("validation_split", default=0.0, min=0.0, max=0.5, step=0.01, optional=True,
                               tooltip="Share of the images held out for a validation loss (0 = off): the plain "
                                       "loss at 5 fixed noise levels with fixed noise, plotted with the training "
                                       "loss; comparable across the run and across resumes."),
                io.Int.Input("validate_every", default=50, min=1, max=1_000_000, optional=True,
                             tooltip="Steps between validation losses (and at the end)."),
                io.Boolean.Input("masked_loss", default=False, optional=True,
                                 tooltip="Weight the loss by the dataset's masks (alpha channel or <name>_mask.png; "
                                         "white = trained). Images without a mask count fully."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained LoRA (as LoraLoader "
                                "would load the saved file)."),
                io.String.Output(display_name="path", tooltip="The saved LoRA file (its EMA file when ema_decay is on)."),
                io.Image.Output(display_name="loss_plot", tooltip="Loss per step."),
                io.Clip.Output(display_name="CLIP", tooltip="The clip input with the trained text-encoder LoRA "
                               "(as LoraLoader would load the saved file); the clip input as is when "
                               "text_encoder_lr is 0."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, conditioning, steps, learning_rate, rank, alpha, batch_size,
                grad_accumulation, prediction, loss_weighting, min_snr_gamma, cep_gamma, cep_distribution,
                input_perturbation, offset_noise, pyramid_iterations, caption_dropout, seed,
                gradient_checkpointing, lr_schedule, warmup_steps, max_grad_norm, save_every,
                filename_prefix, resume, optimizer="adamw", ema_decay=0.0, sample_every=0, sample_prompts="",
                vae=None, keep_last=0, export_format="kohya", clip=None, text_encoder_lr=0.0,
                validation_split=0.0, validate_every=50, masked_loss=False) -> io.NodeOutput:
        import folder_paths

        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        fam = fm.family_of(model, NODE)
        cfg = TrainConfig(steps, learning_rate, rank, alpha, batch_size, grad_accumulation,
                          tm.auto_prediction(model, prediction, NODE), loss_weighting, min_snr_gamma, cep_gamma,
                          cep_distribution, input_perturbation, offset_noise, pyramid_iterations, caption_dropout,
                          seed, lr_schedule, warmup_steps, max_grad_norm, optimizer, ema_decay, text_encoder_lr)
        cfg.validate()
        if text_encoder_lr > 0 and clip is None:
            raise InputError(f"{NODE}: text_encoder_lr > 0 trains a LoRA on the text encoder: connect the clip "
                             "input (the CLIP that encoded the dataset), or set text_encoder_lr to 0")
        if export_format not in EXPORT_FORMATS:
            raise InputError(f"export_format must be one of {EXPORT_FORMATS}, got {export_format!r}")
        if export_format != "kohya" and text_encoder_lr > 0:
            raise InputError(f"{NODE}: export_format {export_format!r} covers the diffusion model's LoRA only; use "
                             "kohya for a run that trains the text encoder too")
        stem = train_run.prefix_path(folder_paths.get_folder_paths("loras")[0], filename_prefix, "loras")
        train_run.check_writable(stem.parent, "LoRA files")
        fm.check_conditioning(fam, conditioning, NODE)
        data = dataset_from(latents, conditioning, masked_loss, with_text=text_encoder_lr > 0)
        run = Run(stem, save_every, gradient_checkpointing, resume, node_id, keep_last, export_format,
                  sample_every, sample_prompts, vae, clip, validation_split, validate_every)
        path, trainer, sd = train(model, data, cfg, run)
        import comfy.sd

        trained, trained_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        curves = [("loss", range(1, len(trainer.losses) + 1), trainer.losses)]
        if trainer.val_losses:
            curves.append(("validation", [s for s, _ in trainer.val_losses], [v for _, v in trainer.val_losses]))
        plot = line_plot(curves, "training loss", "step", "loss", logy=True)
        return io.NodeOutput(trained, str(path), plot, trained_clip, ui=ui.PreviewImage(plot, cls=cls))


@dataclass
class Data:
    """The training set as the trainer reads it (see core.train_data.TrainData)."""
    latents: list[torch.Tensor]  # raw VAE latents [1, C, (T,) h, w], one per item
    rows: list  # per item a cond row, or a list of caption variants
    empty: dict | None
    masks: list | None = None
    flipped: list | None = None
    image_ids: list[int] = field(default_factory=list)


@dataclass
class Run:
    """How the run is carried out around the optimizer steps (none of it changes the trained weights)."""
    stem: Path
    save_every: int = 0
    gradient_checkpointing: bool = False
    resume: bool = False
    node_id: str | None = None
    keep_last: int = 0
    export_format: str = "kohya"
    sample_every: int = 0
    sample_prompts: str = ""
    vae: Any = None
    clip: Any = None
    validation_split: float = 0.0
    validate_every: int = 50


def dataset_from(latents: dict, conditioning: list, masked_loss: bool, with_text: bool = False) -> Data:
    """LATENT + CONDITIONING -> Data. SupercondLoadDataset adds per-item latents of several bucket sizes,
    flipped latents, masks, caption variants and image ids (repeats share one); any other LATENT is
    one item per row of ``samples``. ``with_text``: rows keep their caption (text-encoder training)."""
    rows, empty = conds_from(conditioning, with_text)
    items = latents.get("supercond_items")
    if items is None:
        samples = latents["samples"]
        items = list(samples.split(1)) if samples.shape[0] else []
    masks = latents.get("supercond_masks")
    if masked_loss and masks is None:
        raise InputError(f"{NODE}: masked_loss is on but the latents carry no masks; use SupercondLoadDataset "
                         "with images that have an alpha channel or a <name>_mask.png, or switch masked_loss off")
    ids = list(latents.get("supercond_image_ids") or range(len(items)))
    return Data(list(items), rows, empty, masks if masked_loss else None, latents.get("supercond_flipped"), ids)


@contextmanager
def _attached(net: LoRANetwork | None, clip: Any):
    """The text-encoder LoRA on its CLIP for the run (CLIP layers add to their input in place)."""
    if net is None:
        yield
        return
    with net.attached(), tm.norm_inputs_copied(clip.cond_stage_model):
        yield


def _pick(values: list | None, idx: list[int]) -> list | None:
    return None if values is None else [values[i] for i in idx]


def _stacked(latents: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One tensor when the items share a size (the trainer's fast path), else the list."""
    return torch.cat(latents) if len({tuple(t.shape) for t in latents}) == 1 else latents


def train(model, data: Data, cfg: TrainConfig, run: Run) -> tuple[Path, Trainer, dict[str, torch.Tensor]]:
    """The training run; returns (saved file, the trainer, the saved state dict in the export format)."""
    import comfy.model_management as mm

    mp = model.clone()
    with torch.inference_mode(False), torch.enable_grad():
        mm.load_models_gpu([mp], force_full_load=True)
        device = mp.load_device
        dm = mp.model.diffusion_model
        tm.materialize_weights(dm)
        fam = fm.family_of(mp, NODE)
        net = LoRANetwork(fm.lora_layers(mp, NODE), cfg.rank, cfg.alpha, seeded_generator(cfg.seed, 0x10BA), device)
        te_net, te_clip, encode_text = None, None, None
        if cfg.text_encoder_lr > 0:
            te_clip = text_encoder.prepare(run.clip)
            te_net = LoRANetwork(text_encoder.te_layers(te_clip, fam.name, NODE), cfg.rank, cfg.alpha,
                                 seeded_generator(cfg.seed, 0x7E), device)
            encode_text = text_encoder.encoder(te_clip)
        sigmas = mp.get_model_object("model_sampling").sigmas
        try:
            keep, held = split_validation(data.image_ids, run.validation_split, cfg.seed)
        except DataError as e:
            raise InputError(f"{NODE}: {e}") from None
        rows = _pick(data.rows, keep) if len(data.rows) == len(data.latents) else data.rows  # else: Trainer says
        latents_in = [fm.latent_in(mp, t) for t in data.latents]
        flipped_in = [fm.latent_in(mp, t) for t in data.flipped] if data.flipped is not None else None
        try:
            trainer = Trainer(cfg, list(net.parameters()), fm.ModelCall(mp, device), sigmas,
                              _stacked(_pick(latents_in, keep)),
                              rows, data.empty, device, text_parts=text_parts(fam), masks=_pick(data.masks, keep),
                              flipped=_pick(flipped_in, keep),
                              text_params=list(te_net.parameters()) if te_net is not None else (),
                              encode_text=encode_text)
            held_out = None
            if held:
                first = [r[0] if isinstance(r, list) else r for r in data.rows]  # canonical caption, no flip
                held_out = TrainData(_pick(latents_in, held), [stored_row(r) for r in
                                     (_pick(first, held) if len(first) == len(data.latents) else first)],
                                     _pick(data.masks, held))
        except DataError as e:
            raise InputError(f"{NODE}: {e}") from None
        if run.resume:
            found = tm.last_checkpoint(run.stem)
            if found is None:
                log.info("supercond: no checkpoint of %s to resume; starting at step 0", run.stem)
            else:
                try:
                    trainer.load_state_dict(tm.read_state(tm.state_file(found[0])))
                except TrainError as e:
                    raise InputError(f"cannot resume from {found[0].name}: {e}") from None
                log.info("supercond: resumed %s at step %d", found[0].name, trainer.step)
        meta_base = tm.base_model_name(mp)
        exporter = export_as(run.export_format, mp)

        def kohya() -> dict:
            sd = net.kohya_state_dict(torch.float16)
            return sd | te_net.kohya_state_dict(torch.float16) if te_net is not None else sd

        def weights() -> dict:
            with trainer.ema_applied():  # the EMA's weights when it is on
                return exporter(kohya())

        def save() -> tuple[Path, dict]:
            f = tm.checkpoint_file(run.stem, trainer.step)
            meta = kohya_metadata(cfg.rank, cfg.alpha, trainer.step, cfg.as_dict(), meta_base)
            meta["supercond_format"] = run.export_format
            if run.export_format != "kohya":  # alpha / rank is folded into the up weights there
                meta.pop("ss_network_alpha")
            out = f, exporter(kohya())
            save_atomic(*out, meta)
            if trainer.ema is not None:
                out = tm.ema_file(f), weights()
                save_atomic(*out, meta)
            torch_save_atomic(tm.state_file(f), trainer.state_dict())  # last: its presence means all are there
            return out

        previews = make_previews(mp, run, data, trainer)

        def after_step(n: int):
            if held_out is not None and (n % run.validate_every == 0 or n == cfg.steps):
                log.info("supercond: step %d validation loss %.5f", n, trainer.validation_loss(held_out))
            if previews is not None and (n % run.sample_every == 0 or n == cfg.steps):
                with trainer.ema_applied(), torch.no_grad():
                    return grid(previews.render(n))
            return None

        last: tuple[Path, dict] | None = None
        if trainer.step >= cfg.steps:
            found = tm.last_checkpoint(run.stem)
            last = (tm.ema_file(found[0]) if trainer.ema is not None else found[0], weights())
        net.train()
        with net.attached(), _attached(te_net, te_clip), tm.checkpointing(dm, run.gradient_checkpointing), tm.trainable(mp):
            last = train_run.run_steps(
                lambda: trainer.train_step(between_micro=mm.throw_exception_if_processing_interrupted),
                lambda: trainer.step, cfg.steps, save, run.save_every, run.node_id, last,
                after_step=after_step, keep_last=run.keep_last)
        return last[0], trainer, last[1]


def export_as(export_format: str, model) -> Callable[[dict], dict]:
    """kohya state dict -> the file's state dict in ``export_format``."""
    if export_format == "kohya":
        return lambda sd: sd
    from ...core import lora_export

    layout = fm.diffusers_names(model, NODE)
    return lambda sd: lora_export.export_state_dict(sd, export_format, layout)


def make_previews(mp, run: Run, data: Data, trainer: Trainer) -> Previewer | None:
    """The sample renderer, or None when sample_every is 0."""
    if run.sample_every <= 0:
        return None
    prompts = parse_prompts(run.sample_prompts, trainer.cfg.seed, default_cfg(mp))
    encode = None
    if prompts and run.clip is None:
        raise InputError(f"{NODE}: sample_prompts need the clip input to be encoded; connect the CLIP (or clear "
                         "sample_prompts to sample the first training caption)")
    if run.clip is not None and prompts:
        clip = run.clip
        encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
    if not prompts:
        prompts = parse_prompts("first training caption", trainer.cfg.seed, default_cfg(mp))
    first = data.rows[0][0] if isinstance(data.rows[0], list) else data.rows[0]
    fallback = row_conditioning(first)
    empty = row_conditioning(data.empty) if data.empty is not None else None
    return Previewer(mp, prompts, encode, fallback, empty, data.latents[0], run.vae, run.stem.parent, run.stem.name)


NODES: list[type[io.ComfyNode]] = [SupercondTrainLoRA]
