"""SupercondTrainLoRA: trains a LoRA on the graph's MODEL with the core trainer, shows progress and a
live loss chart, stops on Cancel with a loadable checkpoint, saves kohya-format files."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io, ui

from ...core import objective, optim
from ...core.lora import LAYER_SETS
from ...core.perturb import DISTRIBUTIONS
from ...core.train import TrainConfig
from .. import events
from .. import family as fm
from ..checked import CheckedNode
from ..errors import InputError
from ..inputs import MAX_SEED, float_input, int_input
from ..plots import line_plot
from . import distributed, ranks
from . import model as tm
from . import run as train_run
from .lora_run import NODE, Run, dataset_from, train

log = logging.getLogger("supercond")
CATEGORY = "supercond/training"
EXPORT_FORMATS = ("kohya", "diffusers")


def optimizer_input() -> io.Combo.Input:
    """The optimizer choice: only those that run on this ComfyUI's device with the installed packages."""
    import comfy.model_management as mm

    names = optim.available(mm.get_torch_device())
    missing = [n for n in optim.OPTIMIZERS if n not in names]
    tip = "; ".join(f"{n}: {optim.DESCRIPTIONS[n]}" for n in names)
    if missing:
        tip += f". Not available here: {', '.join(missing)} (see the README)"
    return io.Combo.Input("optimizer", options=names, default="adamw", optional=True, tooltip=tip + ".")


class SupercondTrainLoRA(CheckedNode):
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
                int_input("batch_size", 1, 1, 256, "Latents per micro-batch (per process when processes is above 1 "
                          "or scripts/train runs several: the batch is then this times the processes)."),
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
                               tooltip="kohya: lora_unet_* / lora_te_* keys (kohya's sd-scripts, ComfyUI, A1111). "
                                       "diffusers: the names diffusers' load_lora_weights reads (unet.*, "
                                       "transformer.*, text_encoder.*; SD1.x, SDXL, SD3 and Flux), alpha folded "
                                       "into the up weights. ComfyUI's LoraLoader reads both. Resume works with "
                                       "either."),
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
                io.Combo.Input("lora_layers", options=list(LAYER_SETS), default="all", optional=True,
                               tooltip="Which layers get a LoRA (SD1.x, SDXL, SD3; the DiT families train their "
                                       "transformer blocks either way). all: also the ResBlocks' convolutions, "
                                       "time-embedding projections and down/up-sampling, like kohya's LoCon "
                                       "(conv_dim). transformer: attention, feed-forward and proj_in/out only, "
                                       "kohya's default LoRA: smaller files and faster steps (see the README's "
                                       "bench table)."),
                ranks.processes_input(),
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
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model, latents, conditioning, steps, learning_rate, rank, alpha, batch_size,
                grad_accumulation, prediction, loss_weighting, min_snr_gamma, cep_gamma, cep_distribution,
                input_perturbation, offset_noise, pyramid_iterations, caption_dropout, seed,
                gradient_checkpointing, lr_schedule, warmup_steps, max_grad_norm, save_every,
                filename_prefix, resume, optimizer="adamw", ema_decay=0.0, sample_every=0, sample_prompts="",
                vae=None, keep_last=0, export_format="kohya", clip=None, text_encoder_lr=0.0,
                validation_split=0.0, validate_every=50, masked_loss=False, lora_layers="all", processes=1) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils
        import folder_paths

        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        fam = fm.family_of(model, NODE)
        cfg = TrainConfig(steps, learning_rate, rank, alpha, batch_size, grad_accumulation,
                          tm.auto_prediction(model, prediction, NODE), loss_weighting, min_snr_gamma, cep_gamma,
                          cep_distribution, input_perturbation, offset_noise, pyramid_iterations, caption_dropout,
                          seed, lr_schedule, warmup_steps, max_grad_norm, optimizer, ema_decay, text_encoder_lr,
                          lora_layers)
        cfg.validate()
        if text_encoder_lr > 0 and clip is None:
            raise InputError(f"{NODE}: text_encoder_lr > 0 trains a LoRA on the text encoder: connect the clip "
                             "input (the CLIP that encoded the dataset), or set text_encoder_lr to 0")
        if export_format not in EXPORT_FORMATS:
            raise InputError(f"export_format must be one of {EXPORT_FORMATS}, got {export_format!r}")
        stem = train_run.prefix_path(folder_paths.get_folder_paths("loras")[0], filename_prefix, "loras")
        train_run.check_writable(stem.parent, "LoRA files")
        fm.check_conditioning(fam, conditioning, NODE)
        data = dataset_from(latents, conditioning, masked_loss, with_text=text_encoder_lr > 0)
        if processes > 1 and not ranks.in_rank():
            done = ranks.run(cls.hidden.prompt, node_id, processes, NODE, stem.parent)
            path, losses, val_losses = done["path"], done["losses"], [tuple(v) for v in done["val_losses"]]
            sd = comfy.utils.load_torch_file(path, safe_load=True)  # what rank 0 saved, as LoraLoader reads it
        else:
            run = Run(stem, save_every, gradient_checkpointing, resume, node_id, keep_last, export_format,
                      sample_every, sample_prompts, vae, clip, validation_split, validate_every)
            with train_run.memory_guard(NODE, "lower batch_size, rank or the dataset's resolution "
                                        "(grad_accumulation keeps the effective batch)"):
                path, trainer, sd = train(model, data, cfg, run)
            losses, val_losses = trainer.losses, trainer.val_losses
            if ranks.in_rank() and distributed.writes():
                events.trained({"path": str(path), "losses": losses, "val_losses": val_losses})
        if ranks.in_rank():  # scripts/train runs the graph up to this node: nothing reads a rank's MODEL
            trained, trained_clip = model, clip  # (and with --shard-base, its base is sharded)
        else:
            trained, trained_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        curves = [("loss", range(1, len(losses) + 1), losses)]
        if val_losses:
            curves.append(("validation", [s for s, _ in val_losses], [v for _, v in val_losses]))
        plot = line_plot(curves, "training loss", "step", "loss", logy=True)
        shown = ui.PreviewImage(plot, cls=cls) if distributed.writes() else None  # a file in temp/: rank 0's
        return io.NodeOutput(trained, str(path), plot, trained_clip, ui=shown)


NODES: list[type[io.ComfyNode]] = [SupercondTrainLoRA]
