"""Regenerate the example workflows in workflows/ through the real frontend.

Each example is written down once below as a graph; the frontend builds it (``loadApiJson``),
lays it out, adds a note for the user, and saves the UI-format workflow plus a .jpg thumbnail.
From then on the UI files are the examples: tests and the run command convert them back with
``tools/workflows.to_api``. Run after changing an example:

    python tools/author_workflows.py [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from _pack import import_pack

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("supercond.author")

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD3 = "sd3_medium_incl_clips.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
CHROMA = "Chroma1-HD.safetensors"
WAN = "wan2.1_t2v_1.3B_fp16.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
PROMPT = "a photograph of a lighthouse on a cliff at sunset, dramatic clouds"
NEGATIVE = "blurry, low quality"


class Graph:
    """A tiny API-format graph builder: ``g.add(type, **inputs)`` returns the node id."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.nodes[node_id]["_meta"] = {"title": title}
        return node_id


def out(node_id: str, slot: int = 0) -> list:
    return [node_id, slot]


def _base(g: Graph, ckpt: str = SD15, width: int = 512, batch: int = 4, latent: str = "EmptyLatentImage"):
    ck = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.add("CLIPTextEncode", "Positive", text=PROMPT, clip=out(ck, 1))
    neg = g.add("CLIPTextEncode", "Negative", text=NEGATIVE, clip=out(ck, 1))
    lat = g.add(latent, width=width, height=width, batch_size=batch)
    return ck, pos, neg, lat


def _sample_and_save(g: Graph, model, pos, neg, lat, vae, prefix: str, cfg: float = 7.0,
                     sampler: str = "euler", scheduler: str = "normal") -> None:
    ks = g.add("KSampler", model=model, seed=42, steps=20, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
               positive=pos, negative=neg, latent_image=out(lat), denoise=1.0)
    dec = g.add("VAEDecode", samples=out(ks), vae=vae)
    g.add("SaveImage", images=out(dec), filename_prefix=f"supercond/{prefix}")


def cep_static() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g)
    pert = g.add("SupercondPerturbConditioning", conditioning=out(pos), gamma=1.0, distribution="uniform",
                 scale="relative", apply_to="tokens", seed=7)
    _sample_and_save(g, out(ck), out(pert), out(neg), lat, out(ck, 2), "cep_static")
    note = ("**Static CEP** adds one seeded draw of slight noise to the prompt's embedding: a variation seed "
            "for the prompt. Change `seed` on the Perturb node for a different variation at the same sampler "
            "seed; `gamma` 0 gives exactly the unperturbed image. Pick your SD1.x checkpoint in the loader.")
    return g.nodes, note


def cep_sampling() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g)
    cep = g.add("SupercondCEP", model=out(ck), gamma=1.0, distribution="gaussian", scale="relative",
                apply_to="tokens", branch="positive", resample="every_step", seed_offset=0)
    _sample_and_save(g, out(cep), out(pos), out(neg), lat, out(ck, 2), "cep_sampling")
    sig = g.add("BasicScheduler", model=out(cep), scheduler="normal", steps=20, denoise=1.0)
    g.add("SupercondPlotPerturbation", model=out(cep), sigmas=out(sig), conditioning=out(pos))
    note = ("**CEP during sampling**: fresh CEP noise (Chen et al., NeurIPS 2024) on the positive prompt at every "
            "model call, a distinct draw for each image of the batch, seeded from the KSampler seed (same seed, "
            "same images). The plot shows the noise-to-signal ratio per step.")
    return g.nodes, note


def cads_sampling() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g)
    cads = g.add("SupercondCADS", model=out(ck), tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0,
                 apply_to="tokens", branch="positive", time_base="sigma", seed_offset=0)
    _sample_and_save(g, out(cads), out(pos), out(neg), lat, out(ck, 2), "cads_sampling")
    sig = g.add("BasicScheduler", model=out(cads), scheduler="normal", steps=20, denoise=1.0)
    g.add("SupercondPlotPerturbation", model=out(cads), sigmas=out(sig), conditioning=out(pos))
    note = ("**CADS** (Sadat et al., ICLR 2024): the prompt is replaced by noise early in sampling (sampling time "
            "above tau2), clean late (below tau1), linearly annealed between, for more diverse images of one "
            "prompt. Compare a batch with and without it (bypass the node with Ctrl+B).")
    return g.nodes, note


def cads_flow_sd3() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g, ckpt=SD3, width=1024, batch=2, latent="EmptySD3LatentImage")
    cads = g.add("SupercondCADS", model=out(ck), tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0,
                 apply_to="both", branch="positive", time_base="sigma", seed_offset=0)
    _sample_and_save(g, out(cads), out(pos), out(neg), lat, out(ck, 2), "cads_sd3", cfg=4.5,
                     scheduler="sgm_uniform")
    note = ("**CADS on a flow model (SD3)**: the schedule follows the sampling time computed from sigma, so "
            "flow models (whose timestep is sigma itself) get the same annealing as SD1.x. `apply_to` both also "
            "noises the pooled embedding.")
    return g.nodes, note


def noise_correction() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g, batch=2)
    nc = g.add("SupercondNoiseCorrection", model=out(ck), strength=1.0)
    _sample_and_save(g, out(nc), out(pos), out(neg), lat, out(ck, 2), "noise_correction", scheduler="simple")
    _sample_and_save(g, out(ck), out(pos), out(neg), lat, out(ck, 2), "noise_correction_off", scheduler="simple")
    note = ("**Noise correction** (Imagine Flash): the first step keeps the model's x0 estimate but re-noises it "
            "with the true initial noise, which an eps model (SD1.x/SDXL) cannot predict at its first, non-zero-SNR "
            "step: more colour and contrast, most visible at 4-10 steps. The second KSampler is the same seed "
            "without it. A no-op on flow models, zero-terminal-SNR v models and img2img (denoise < 1).")
    return g.nodes, note


def schedule_sigmas_offset_noise() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g, batch=2)
    trailing = g.add("SupercondScheduleSigmas", "Trailing", model=out(ck), steps=10, spacing="trailing",
                     zero_terminal_snr=False, first_sigma="as_scheduled", first_sigma_value=136.0)
    leading = g.add("SupercondScheduleSigmas", "Leading (SD's DDIM)", model=out(ck), steps=10, spacing="leading",
                    zero_terminal_snr=False, first_sigma="as_scheduled", first_sigma_value=136.0)
    karras = g.add("SupercondScheduleSigmas", "Karras", model=out(ck), steps=10, spacing="karras",
                   zero_terminal_snr=False, first_sigma="as_scheduled", first_sigma_value=136.0)
    g.add("SupercondPlotSigmas", sigmas=out(trailing), snr_convention="eps/v: SNR = 1/sigma^2",
          sigmas_2=out(leading), sigmas_3=out(karras))
    noise = g.add("SupercondOffsetNoise", noise_seed=42, offset=0.1, pyramid_iterations=0, pyramid_discount=0.3)
    guider = g.add("CFGGuider", model=out(ck), positive=out(pos), negative=out(neg), cfg=7.0)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    sca = g.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                sigmas=out(trailing), latent_image=out(lat))
    dec = g.add("VAEDecode", samples=out(sca), vae=out(ck, 2))
    g.add("SaveImage", images=out(dec), filename_prefix="supercond/schedule_offset_noise")
    note = ("**Schedules and offset noise** with SamplerCustomAdvanced. Schedule Sigmas picks the timestep spacing "
            "(trailing starts at the noisiest timestep; SD's leading DDIM spacing never does), optional zero terminal "
            "SNR (for v-prediction models trained with it) and the first sigma. The plot compares three schedules. "
            "Offset / Pyramid Noise replaces RandomNoise: offset 0 and pyramid 0 give exactly RandomNoise's noise; "
            "offset adds a per-channel constant (darker darks, brighter brights on models trained with offset noise).")
    return g.nodes, note


def schedule_fit() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g, batch=2)
    fit = g.add("SupercondFitSchedule", model=out(ck), positive=out(pos), negative=out(neg), steps=8,
                teacher_steps=100, cfg=7.0, sampler_name="euler", method="optimal_stepsize", samples=4, seed=0,
                filename_prefix="supercond/schedule", latent_image=out(lat))
    simple = g.add("BasicScheduler", "simple, same steps", model=out(ck), scheduler="simple", steps=8, denoise=1.0)
    guider = g.add("CFGGuider", model=out(ck), positive=out(pos), negative=out(neg), cfg=7.0)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    noise = g.add("RandomNoise", noise_seed=42)
    for sigmas, prefix in ((fit, "schedule_fitted"), (simple, "schedule_simple")):
        sca = g.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                    sigmas=out(sigmas), latent_image=out(lat))
        dec = g.add("VAEDecode", samples=out(sca), vae=out(ck, 2))
        g.add("SaveImage", images=out(dec), filename_prefix=f"supercond/{prefix}")
    note = ("**Fit a schedule to your model** (Optimal Stepsize). Fit Schedule runs the model as a teacher over "
            "teacher_steps fine steps and picks the 8 steps whose result lands closest to it, for this model, "
            "prompt, cfg and sampler. It saves the schedule under models/supercond_schedules (load it next time "
            "with Load Fitted Schedule, at any step count) and shows it against simple, karras and ComfyUI's "
            "preset. The two SamplerCustomAdvanced nodes sample the same noise on the fitted schedule and on "
            "`simple` at the same 8 steps. The fit costs about samples x teacher_steps x (steps + 1) model calls.")
    return g.nodes, note


def epsilon_scaling_sd3() -> tuple[dict, str]:
    g = Graph()
    ck, pos, neg, lat = _base(g, ckpt=SD3, width=1024, batch=1, latent="EmptySD3LatentImage")
    eps = g.add("SupercondEpsilonScaling", model=out(ck), b=1.005, k=0.0)
    _sample_and_save(g, out(eps), out(pos), out(neg), lat, out(ck, 2), "epsilon_scaling_sd3", cfg=4.5,
                     scheduler="sgm_uniform")
    note = ("**Epsilon scaling** (Ning et al., exposure bias) divides the model's noise component by "
            "lambda_t = k*t + b at every step. Here on a flow model (SD3), where the noise component is "
            "(x - (1 - sigma) D)/sigma, not ComfyUI's built-in (x - D)/sigma; it also works on eps and v models. "
            "b 1.005 is a typical start; 1.0 with k 0 is off.")
    return g.nodes, note


def singlepass_ksampler() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    pos = g.add("CLIPTextEncode", "Positive", text=PROMPT, clip=out(ck, 1))
    neg = g.add("CLIPTextEncode", "Negative (not evaluated: the head stands in)", text="", clip=out(ck, 1))
    lat = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    head = g.add("SupercondNewHead", model=out(ck), head="projection")
    sp = g.add("SupercondSinglePass", model=out(head), real_cfg_steps=0, negative="head")
    _sample_and_save(g, out(sp), out(pos), out(neg), lat, out(ck, 2), "singlepass", cfg=5.0)
    note = ("**Single-pass CFG**: one model call per step instead of two; the unconditional prediction comes "
            "from a second head in the same pass, and the KSampler's cfg still sets the scale. Swap "
            "`New Single-Pass Head` for `Load Single-Pass Head` with a trained head: a fresh head predicts "
            "no guidance (the image equals cfg 1). `negative` = head ignores the negative prompt; real_cfg uses it "
            "(two passes). `real_cfg_steps` runs true CFG for the first steps.")
    return g.nodes, note


def singlepass_guider() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    pos = g.add("CLIPTextEncode", "Positive", text=PROMPT, clip=out(ck, 1))
    lat = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    head = g.add("SupercondNewHead", model=out(ck), head="last_block")
    guider = g.add("SupercondSinglePassGuider", model=out(head), positive=out(pos), cfg=5.0)
    noise = g.add("RandomNoise", noise_seed=42)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    sig = g.add("BasicScheduler", model=out(head), scheduler="normal", steps=20, denoise=1.0)
    adv = g.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                sigmas=out(sig), latent_image=out(lat))
    dec = g.add("VAEDecode", samples=out(adv), vae=out(ck, 2))
    g.add("SaveImage", images=out(dec), filename_prefix="supercond/singlepass_guider")
    note = ("**Single-pass CFG guider** for SamplerCustomAdvanced: CFG at `cfg` from one model call per step, "
            "no negative prompt (the head is the unconditional branch). Load a trained head with "
            "`Load Single-Pass Head`; a fresh one gives the cfg 1 image.")
    return g.nodes, note


def _distill_then_sample(g: Graph, ck: str, pos: str, empty: str, neg: str, head_prefix: str, prefix: str,
                         **extra) -> None:
    """Distil a last_block + LoRA head on the empty prompt ``empty`` (``extra``: further trainer inputs), then
    sample it single-pass through the stock KSampler with ``neg`` as the negative."""
    tr = g.add("SupercondTrainHead", model=out(ck), positive=out(pos), negative=out(empty), mode="distill", steps=300,
               learning_rate=1e-4, head="last_block", lora_rank=8, cfg_min=3.0, cfg_max=9.0, seed=0, save_every=100,
               filename_prefix=head_prefix, resume=False, **extra)
    g.add("PreviewImage", images=out(tr, 2))
    sp = g.add("SupercondSinglePass", model=out(tr), real_cfg_steps=0, negative="head")
    lat = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _sample_and_save(g, out(sp), out(pos), out(neg), lat, out(ck, 2), prefix, cfg=6.0)


def singlepass_distill() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    pos = g.add("CLIPTextEncode", "Positive", text=PROMPT, clip=out(ck, 1))
    neg = g.add("CLIPTextEncode", "Empty negative (what the head learns)", text="", clip=out(ck, 1))
    _distill_then_sample(g, ck, pos, neg, neg, "supercond/distilled_head", "singlepass_distill")
    note = ("**Make any checkpoint single-pass**: `Train Single-Pass Head` distils a second head from the frozen "
            "checkpoint: on the model's own CFG trajectories (no images needed) the head learns to predict, from "
            "the features of the prompt's forward pass, what the model predicts for the empty prompt. The model "
            "itself is unchanged. `Single-Pass CFG` then gives the KSampler CFG from one model call per step. "
            "The head is saved under models/supercond_heads (`supercond/distilled_head_<step>.safetensors`): next "
            "time skip training and put `Load Single-Pass Head` (press R to refresh its list) between the "
            "checkpoint and `Single-Pass CFG`. Train with your own prompts. `last_block` with `lora_rank` 8 "
            "fits far closer than `projection` (which is cheaper but underfits); more steps fit closer still.")
    return g.nodes, note


def singlepass_negative() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    pos = g.add("CLIPTextEncode", "Positive", text=PROMPT, clip=out(ck, 1))
    empty = g.add("CLIPTextEncode", "Empty prompt", text="", clip=out(ck, 1))
    neg = g.add("CLIPTextEncode", "Negative (read by the head)", text=NEGATIVE, clip=out(ck, 1))
    _distill_then_sample(g, ck, pos, empty, neg, "supercond/negative_head", "singlepass_negative", batch_size=4,
                         rolled_fraction=0.1, clip=out(ck, 1),
                         negative_prompts="blurry, low quality\nwatermark, text\ncartoon, drawing\noversaturated, grainy")
    note = ("**Negative prompts at one model call per step**: `Train Single-Pass Head` with `negative_prompts` "
            "(one per line) distils a last_block head that reads the negative prompt: on the model's own CFG "
            "trajectories, each with a negative drawn from those lines, the empty prompt and the wired one, the "
            "head learns the model's prediction for that negative. `Single-Pass CFG` then hands the KSampler's "
            "negative to the head: CFG with a real negative from one model call per step. Works where the "
            "model's last block reads the prompt (SD1.x, Wan); the head file remembers that it reads negatives, "
            "so `Load Single-Pass Head` keeps it. Negatives far from the trained ones are read less faithfully.")
    return g.nodes, note


def lora_train() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    ds = g.add("SupercondLoadDataset", folder="supercond_example", clip=out(ck, 1), vae=out(ck, 2), resolution=512,
               flip=True, random_crop=False, seed=0)
    tr = g.add("SupercondTrainLoRA", model=out(ck), latents=out(ds), conditioning=out(ds, 1), steps=200,
               learning_rate=1e-4, rank=8, alpha=8.0, batch_size=1, grad_accumulation=1, prediction="auto",
               loss_weighting="min_snr", min_snr_gamma=5.0, cep_gamma=1.0, cep_distribution="uniform",
               input_perturbation=0.1, offset_noise=0.05, pyramid_iterations=0, caption_dropout=0.1, seed=0,
               gradient_checkpointing=False, lr_schedule="cosine", warmup_steps=10, max_grad_norm=1.0,
               save_every=50, filename_prefix="supercond/example_lora", resume=False)
    g.add("PreviewImage", images=out(tr, 2))
    pos = g.add("CLIPTextEncode", "Positive", text="a red disc on a pale background, supercond style", clip=out(ck, 1))
    neg = g.add("CLIPTextEncode", "Negative", text="", clip=out(ck, 1))
    lat = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _sample_and_save(g, out(tr), out(pos), out(neg), lat, out(ck, 2), "lora_train")
    note = ("**LoRA trainer**: the dataset node encodes a folder of images + .txt captions (here the built-in "
            "synthetic example set, written to ComfyUI's input folder on first use) and caches it; the trainer "
            "trains a LoRA on the loaded MODEL with min-SNR, CEP, input perturbation, offset noise and caption "
            "dropout, shows progress and a live loss chart, and saves kohya-format files under models/loras "
            "(`supercond/example_lora_<step>.safetensors`, readable by the stock Load LoRA node). Cancel keeps "
            "the last checkpoint; `resume` continues from it. The KSampler samples with the trained MODEL.")
    return g.nodes, note


def lora_train_buckets() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    ds = g.add("SupercondLoadDataset", folder="supercond_example_buckets", clip=out(ck, 1), vae=out(ck, 2),
               resolution=512, flip=True, random_crop=False, seed=0, buckets=True, trigger="sks",
               shuffle_tags=True, keep_tokens=1)
    prompts = ("sks, red, disc, pale background --d 1\n"
               "sks, blue, square, pale background --w 640 --h 384 --d 2")
    tr = g.add("SupercondTrainLoRA", model=out(ck), latents=out(ds), conditioning=out(ds, 1), steps=300,
               learning_rate=1e-4, rank=16, alpha=16.0, batch_size=2, grad_accumulation=1, prediction="auto",
               loss_weighting="min_snr", min_snr_gamma=5.0, cep_gamma=0.0, cep_distribution="uniform",
               input_perturbation=0.0, offset_noise=0.05, pyramid_iterations=0, caption_dropout=0.05, seed=0,
               gradient_checkpointing=False, lr_schedule="cosine", warmup_steps=10, max_grad_norm=1.0,
               save_every=50, filename_prefix="supercond/buckets_lora", resume=False, optimizer="adamw",
               ema_decay=0.999, sample_every=50, sample_prompts=prompts, vae=out(ck, 2), keep_last=2,
               export_format="kohya", clip=out(ck, 1), text_encoder_lr=0.0, validation_split=0.2,
               validate_every=25, masked_loss=True)
    g.add("PreviewImage", images=out(tr, 2))
    pos = g.add("CLIPTextEncode", "Positive", text="sks, green, disc, pale background", clip=out(ck, 1))
    neg = g.add("CLIPTextEncode", "Negative", text="", clip=out(ck, 1))
    lat = g.add("EmptyLatentImage", width=640, height=384, batch_size=1)
    _sample_and_save(g, out(tr), out(pos), out(neg), lat, out(ck, 2), "lora_train_buckets")
    note = ("**LoRA trainer, kohya-style data**: the built-in mixed-aspect set (3:2, 2:3 and square images, "
            "masks as `_mask.png` and in an alpha channel, a `2_repeat` folder that counts twice) is encoded in "
            "aspect-ratio buckets of about 512x512 pixels, both flips cached, tags shuffled after the trigger "
            "`sks`. The trainer uses the masks (masked_loss), keeps an EMA, holds out 20% of the images for a "
            "validation loss (plotted with the training loss), samples the two prompts every 50 steps (shown "
            "live in the node and saved beside the checkpoints), and keeps only the newest 2 checkpoints. Point "
            "`folder` at your own images (a sub-folder of ComfyUI's input directory).")
    return g.nodes, note


def lora_load() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    lora = g.add("LoraLoader", model=out(ck), clip=out(ck, 1), lora_name="supercond/example_lora_000200.safetensors",
                 strength_model=1.0, strength_clip=1.0)
    pos = g.add("CLIPTextEncode", "Positive", text="a red disc on a pale background, supercond style",
                clip=out(lora, 1))
    neg = g.add("CLIPTextEncode", "Negative", text="", clip=out(lora, 1))
    lat = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _sample_and_save(g, out(lora), out(pos), out(neg), lat, out(ck, 2), "lora_load")
    note = ("**Use a trained LoRA**: run the `lora_train` example first; it saves "
            "`supercond/example_lora_000200.safetensors` (and every 50 steps) under models/loras. The stock "
            "Load LoRA node reads that kohya-format file onto the checkpoint it was trained on and gives the "
            "trained MODEL's images. Pick another step's file, or your own prefix's, in `lora_name` "
            "(press R to refresh the list after training); `strength_model` scales the LoRA.")
    return g.nodes, note


def sdxl_lora_train() -> tuple[dict, str]:
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", ckpt_name=SDXL)
    ds = g.add("SupercondLoadDataset", folder="supercond_example", clip=out(ck, 1), vae=out(ck, 2), resolution=1024,
               flip=True, random_crop=False, seed=0)
    tr = g.add("SupercondTrainLoRA", model=out(ck), latents=out(ds), conditioning=out(ds, 1), steps=300,
               learning_rate=1e-4, rank=16, alpha=16.0, batch_size=1, grad_accumulation=2, prediction="auto",
               loss_weighting="min_snr", min_snr_gamma=5.0, cep_gamma=1.0, cep_distribution="uniform",
               input_perturbation=0.1, offset_noise=0.05, pyramid_iterations=0, caption_dropout=0.1, seed=0,
               gradient_checkpointing=True, lr_schedule="cosine", warmup_steps=20, max_grad_norm=1.0,
               save_every=100, filename_prefix="supercond/sdxl_lora", resume=False)
    g.add("PreviewImage", images=out(tr, 2))
    pos = g.add("CLIPTextEncode", "Positive", text="a red disc on a pale background, supercond style", clip=out(ck, 1))
    neg = g.add("CLIPTextEncode", "Negative", text=NEGATIVE, clip=out(ck, 1))
    lat = g.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    _sample_and_save(g, out(tr), out(pos), out(neg), lat, out(ck, 2), "sdxl_lora_train", cfg=6.0)
    note = ("**SDXL LoRA** (also Illustrious, Pony, NoobAI): the same trainer as `lora_train`, on an SDXL "
            "checkpoint. The trainer calls the UNet with the size embeddings the sampler builds for each "
            "latent (pooled CLIP-G + original/crop/target size from the latent's own size), so train at the "
            "resolution you sample at. LoRA keys are kohya's SDXL names (`lora_unet_down_blocks_1_...`): the "
            "stock Load LoRA node and kohya-compatible tools read the file (models/loras/"
            "`supercond/sdxl_lora_<step>.safetensors`). Gradient checkpointing is on to fit 1024 px in less memory.")
    return g.nodes, note


def chroma_cads() -> tuple[dict, str]:
    g = Graph()
    unet = g.add("UNETLoader", unet_name=CHROMA, weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=T5XXL, type="chroma", device="default")
    vae = g.add("VAELoader", vae_name="ae.safetensors")
    pos = g.add("CLIPTextEncode", "Positive", text=PROMPT, clip=out(clip))
    neg = g.add("CLIPTextEncode", "Negative", text=NEGATIVE, clip=out(clip))
    cads = g.add("SupercondCADS", model=out(unet), tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0, apply_to="tokens",
                 branch="positive", time_base="sigma", seed_offset=0)
    lat = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=4)
    _sample_and_save(g, out(cads), out(pos), out(neg), lat, out(vae), "chroma_cads", cfg=4.0, scheduler="simple")
    note = ("**CADS on Chroma** for more varied images from one prompt: annealed noise on the T5 tokens early "
            "in sampling (noise level above `tau2`'s point), none at the end. Chroma samples with real CFG, so "
            "`branch` positive leaves the negative untouched. Chroma's T5 conditioning has no pooled part: "
            "`apply_to` pooled is refused. The same node works on Flux, Qwen-Image, Wan, SDXL, SD3 and SD1.x; "
            "compare a batch with and without it at the same seed.")
    return g.nodes, note


def wan_singlepass_distill() -> tuple[dict, str]:
    g = Graph()
    unet = g.add("UNETLoader", unet_name=WAN, weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=UMT5, type="wan", device="default")
    vae = g.add("VAELoader", vae_name="wan_2.1_vae.safetensors")
    pos = g.add("CLIPTextEncode", "Positive", text="a red fox running through snow, cinematic", clip=out(clip))
    neg = g.add("CLIPTextEncode", "Empty negative (what the head learns)", text="", clip=out(clip))
    tr = g.add("SupercondTrainHead", model=out(unet), positive=out(pos), negative=out(neg), mode="distill",
               steps=300, learning_rate=1e-4, head="last_block", lora_rank=8, cfg_min=3.0, cfg_max=7.0, seed=0,
               save_every=100, filename_prefix="supercond/wan_head", resume=False)
    g.add("PreviewImage", images=out(tr, 2))
    sp = g.add("SupercondSinglePass", model=out(tr), real_cfg_steps=0, negative="head")
    lat = g.add("EmptyHunyuanLatentVideo", width=832, height=480, length=33, batch_size=1)
    ks = g.add("KSampler", model=out(sp), seed=42, steps=30, cfg=5.0, sampler_name="uni_pc", scheduler="simple",
               positive=out(pos), negative=out(neg), latent_image=out(lat), denoise=1.0)
    dec = g.add("VAEDecode", samples=out(ks), vae=out(vae))
    g.add("SaveAnimatedWEBP", images=out(dec), filename_prefix="supercond/wan_singlepass", fps=16.0, lossless=False,
          quality=90, method="default")
    note = ("**Single-pass CFG on Wan 2.1**: `Train Single-Pass Head` distils a second head from the frozen Wan "
            "model (its own CFG trajectories, one-frame latents, no videos needed), then `Single-Pass CFG` gives "
            "the KSampler CFG from one model call per step instead of two. The head is saved under "
            "models/supercond_heads (`supercond/wan_head_<step>.safetensors`); next time use `Load Single-Pass "
            "Head` instead of training. Distil with prompts like the ones you will use.")
    return g.nodes, note


EXAMPLES: dict[str, Callable[[], tuple[dict, str]]] = {
    "cep_static": cep_static,
    "cep_sampling": cep_sampling,
    "cads_sampling": cads_sampling,
    "cads_flow_sd3": cads_flow_sd3,
    "noise_correction": noise_correction,
    "schedule_sigmas_offset_noise": schedule_sigmas_offset_noise,
    "epsilon_scaling_sd3": epsilon_scaling_sd3,
    "schedule_fit": schedule_fit,
    "singlepass_ksampler": singlepass_ksampler,
    "singlepass_guider": singlepass_guider,
    "singlepass_distill": singlepass_distill,
    "singlepass_negative": singlepass_negative,
    "lora_train": lora_train,
    "lora_train_buckets": lora_train_buckets,
    "lora_load": lora_load,
    "sdxl_lora_train": sdxl_lora_train,
    "chroma_cads": chroma_cads,
    "wan_singlepass_distill": wan_singlepass_distill,
}


def _import_tools():
    import_pack()
    from supercond.tools import browser, paths, server
    return browser, paths, server


def author(names: list[str]) -> None:
    browser, paths, server = _import_tools()
    comfyui = paths.find_comfyui()
    if comfyui is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH")
    with tempfile.TemporaryDirectory() as tmp, server.ComfyServer(comfyui, Path(tmp)) as srv, \
            browser.open_app(srv.url) as page:
        for name in names:
            api, note = EXAMPLES[name]()
            page.evaluate("(api) => window.app.loadApiJson(api, 'example')", api)
            page.evaluate(
                """(text) => {
                    const note = window.LiteGraph.createNode("MarkdownNote");
                    note.widgets[0].value = text;
                    note.pos = [0, -260]; note.size = [520, 200];
                    window.app.graph.add(note);
                    // Examples should reproduce: keep seeds fixed rather than randomized after each run.
                    for (const nd of window.app.graph._nodes)
                        for (const w of nd.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
                    window.app.canvas.ds.offset = [40, 300]; window.app.canvas.ds.scale = 0.75;
                    window.app.graph.setDirtyCanvas(true, true);
                }""",
                note,
            )
            # Stringify in the page: undefined fields must vanish, not come back as null.
            workflow = json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
            path = REPO / "workflows" / f"{name}.json"
            path.write_text(json.dumps(workflow, indent=1) + "\n")
            browser.screenshot(page, path.with_suffix(".jpg"), quality=70)
            log.info("wrote %s and its thumbnail", path.relative_to(REPO))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(EXAMPLES), help="examples to regenerate (default all)")
    args = ap.parse_args()
    author(args.only or list(EXAMPLES))


if __name__ == "__main__":
    main()
