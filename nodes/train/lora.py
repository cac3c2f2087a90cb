"""SupercondTrainLoRA: trains a LoRA on the graph's MODEL with the core trainer, shows progress and a
live loss chart, stops on Cancel with a loadable checkpoint, saves kohya-format files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io, ui

from ...core import objective, optim
from ...core.files import save_atomic, torch_save_atomic
from ...core.lora import LoRANetwork, kohya_metadata
from ...core.perturb import DISTRIBUTIONS
from ...core.seeds import seeded_generator
from ...core.train import TrainConfig, Trainer, TrainError
from .. import family as fm
from ..errors import InputError
from ..inputs import MAX_SEED, float_input, int_input
from ..plots import line_plot
from . import model as tm
from . import run as train_run

log = logging.getLogger("supercond")
CATEGORY = "supercond/training"
NODE = "SupercondTrainLoRA"


def text_parts(fam: fm.Family) -> dict[str, tuple[int, ...] | None]:
    """The text parts of a training row that CEP perturbs, with the family's encoder segments."""
    parts: dict[str, tuple[int, ...] | None] = {"cross_attn": fam.token_segments}
    if fam.pooled:
        parts["pooled_output"] = fam.pooled
    return parts


def conds_from(conditioning: list) -> tuple[list[dict], dict | None]:
    """CONDITIONING -> one row per prompt (batch rows split): the tokens as ``cross_attn`` plus the
    extras the model's extra_conds read (pooled output, guidance, SDXL sizes, ...; fm.COND_EXTRAS), and
    the empty prompt's row that SupercondLoadDataset attaches (for caption dropout)."""
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
            rows.append(row)
        empty = empty or extra.get("supercond_empty")
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
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained LoRA (as LoraLoader "
                                "would load the saved file)."),
                io.String.Output(display_name="path", tooltip="The saved LoRA file (its EMA file when ema_decay is on)."),
                io.Image.Output(display_name="loss_plot", tooltip="Loss per step."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, conditioning, steps, learning_rate, rank, alpha, batch_size,
                grad_accumulation, prediction, loss_weighting, min_snr_gamma, cep_gamma, cep_distribution,
                input_perturbation, offset_noise, pyramid_iterations, caption_dropout, seed,
                gradient_checkpointing, lr_schedule, warmup_steps, max_grad_norm, save_every,
                filename_prefix, resume, optimizer="adamw", ema_decay=0.0) -> io.NodeOutput:
        import folder_paths

        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        fam = fm.family_of(model, NODE)
        cfg = TrainConfig(steps, learning_rate, rank, alpha, batch_size, grad_accumulation,
                          tm.auto_prediction(model, prediction, NODE), loss_weighting, min_snr_gamma, cep_gamma,
                          cep_distribution, input_perturbation, offset_noise, pyramid_iterations, caption_dropout,
                          seed, lr_schedule, warmup_steps, max_grad_norm, optimizer, ema_decay)
        cfg.validate()
        stem = train_run.prefix_path(folder_paths.get_folder_paths("loras")[0], filename_prefix, "loras")
        train_run.check_writable(stem.parent, "LoRA files")
        fm.check_conditioning(fam, conditioning, NODE)
        rows, empty = conds_from(conditioning)
        path, losses, sd = train(model, latents["samples"], rows, empty, cfg, stem, save_every,
                                 gradient_checkpointing, resume, node_id)
        import comfy.sd

        trained, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
        plot = line_plot([("loss", range(1, len(losses) + 1), losses)], "training loss", "step", "loss",
                         logy=True)
        return io.NodeOutput(trained, str(path), plot, ui=ui.PreviewImage(plot, cls=cls))


def train(model, latents: torch.Tensor, rows: list[dict], empty: dict | None, cfg: TrainConfig, stem: Path,
          save_every: int, gradient_checkpointing: bool, resume: bool, node_id: str | None = None
          ) -> tuple[Path, list[float], dict[str, torch.Tensor]]:
    """The training run; returns (saved file, losses, the saved kohya state dict)."""
    import comfy.model_management as mm

    mp = model.clone()
    with torch.inference_mode(False), torch.enable_grad():
        mm.load_models_gpu([mp], force_full_load=True)
        device = mp.load_device
        dm = mp.model.diffusion_model
        tm.materialize_weights(dm)
        fam = fm.family_of(mp, NODE)
        net = LoRANetwork(fm.lora_layers(mp, NODE), cfg.rank, cfg.alpha, seeded_generator(cfg.seed, 0x10BA), device)
        sigmas = mp.get_model_object("model_sampling").sigmas
        trainer = Trainer(cfg, list(net.parameters()), fm.ModelCall(mp, device), sigmas, fm.latent_in(mp, latents),
                          rows, empty, device, text_parts=text_parts(fam))
        if resume:
            found = tm.last_checkpoint(stem)
            if found is None:
                log.info("supercond: no checkpoint of %s to resume; starting at step 0", stem)
            else:
                try:
                    trainer.load_state_dict(tm.read_state(tm.state_file(found[0])))
                except TrainError as e:
                    raise InputError(f"cannot resume from {found[0].name}: {e}") from None
                log.info("supercond: resumed %s at step %d", found[0].name, trainer.step)
        meta_base = tm.base_model_name(mp)

        def weights() -> dict:
            with trainer.ema_applied():  # the EMA's weights when it is on
                return net.kohya_state_dict(torch.float16)

        def save() -> tuple[Path, dict]:
            f = tm.checkpoint_file(stem, trainer.step)
            meta = kohya_metadata(cfg.rank, cfg.alpha, trainer.step, cfg.as_dict(), meta_base)
            out = f, net.kohya_state_dict(torch.float16)
            save_atomic(*out, meta)
            if trainer.ema is not None:
                out = tm.ema_file(f), weights()
                save_atomic(*out, meta)
            torch_save_atomic(tm.state_file(f), trainer.state_dict())  # last: its presence means all are there
            return out

        last: tuple[Path, dict] | None = None
        if trainer.step >= cfg.steps:
            found = tm.last_checkpoint(stem)
            last = (tm.ema_file(found[0]) if trainer.ema is not None else found[0], weights())
        net.train()
        with net.attached(), tm.checkpointing(dm, gradient_checkpointing), tm.trainable(mp):
            last = train_run.run_steps(
                lambda: trainer.train_step(between_micro=mm.throw_exception_if_processing_interrupted),
                lambda: trainer.step, cfg.steps, save, save_every, node_id, last)
        return last[0], trainer.losses, last[1]


NODES: list[type[io.ComfyNode]] = [SupercondTrainLoRA]
