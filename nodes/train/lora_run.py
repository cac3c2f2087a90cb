"""The LoRA training run behind SupercondTrainLoRA: the graph's LATENT and CONDITIONING as training data,
the model made trainable, the core trainer's loop with checkpoints, previews and validation, and the
files it writes (kohya or diffusers names)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...core.files import save_atomic, torch_save_atomic
from ...core.lora import LoRANetwork, kohya_metadata
from ...core.seeds import seeded_generator
from ...core.train import TrainConfig, Trainer, TrainError, stored_row
from ...core.train_data import DataError, TrainData, split_validation
from .. import events
from .. import family as fm
from ..errors import InputError
from . import distributed, sharding, text_encoder
from . import model as tm
from . import run as train_run
from .previews import Previewer, default_cfg, grid, parse_prompts, row_conditioning

log = logging.getLogger("supercond")
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


def train(model, data: Data, cfg: TrainConfig, run: Run) -> tuple[Path, Trainer, dict[str, torch.Tensor]]:
    """The training run; returns (saved file, the trainer, the saved state dict in the export format)."""
    import comfy.model_management as mm

    distributed.inputs_ready()
    rank, world = distributed.shard()
    cfg = replace(cfg, batch_size=cfg.batch_size * world)  # batch_size is per process; the state keeps the global
    mp = model.clone()
    sharded = sharding.requested()
    with torch.inference_mode(False), torch.enable_grad(), ExitStack() as shared:
        sharding.load(mp)
        device = mp.load_device
        dm = mp.model.diffusion_model
        shared.enter_context(tm.autograd_weights(dm))  # every clone shares dm: put back on the way out
        fam = fm.family_of(mp, NODE)
        net = LoRANetwork(fm.lora_layers(mp, NODE, cfg.lora_layers), cfg.rank, cfg.alpha, seeded_generator(cfg.seed, 0x10BA), device)
        te_net, te_clip, encode_text = None, None, None
        if cfg.text_encoder_lr > 0:
            te_clip = text_encoder.prepare(run.clip)
            shared.enter_context(tm.autograd_weights(te_clip.cond_stage_model))
            te_net = LoRANetwork(text_encoder.te_layers(te_clip, fam.name, NODE), cfg.rank, cfg.alpha,
                                 seeded_generator(cfg.seed, 0x7E), device)
            encode_text = text_encoder.encoder(te_clip)
        call = fm.ModelCall(mp, device)
        if sharded:
            sharding.shard_base(dm, device, fam.inplace_residual)
            call = sharding.Lockstep(call)
        sigmas = mp.get_model_object("model_sampling").sigmas
        try:
            keep, held = split_validation(data.image_ids, run.validation_split, cfg.seed)
        except DataError as e:
            raise InputError(f"{NODE}: {e}") from None
        rows = _pick(data.rows, keep) if len(data.rows) == len(data.latents) else data.rows  # else: Trainer says
        latents_in = [fm.latent_in(mp, t) for t in data.latents]
        flipped_in = [fm.latent_in(mp, t) for t in data.flipped] if data.flipped is not None else None
        try:
            trainer = Trainer(cfg, list(net.parameters()), distributed.parallel(call, net, te_net),
                              sigmas,
                              _pick(latents_in, keep),
                              rows, data.empty, device, text_parts=text_parts(fam), masks=_pick(data.masks, keep),
                              flipped=_pick(flipped_in, keep),
                              text_params=list(te_net.parameters()) if te_net is not None else (),
                              encode_text=encode_text, shard=(rank, world), mean_across=distributed.mean_across())
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
            if rank:  # rank 0 writes; the others hold the same weights and return what rank 0 returns
                return (tm.ema_file(f), weights()) if trainer.ema is not None else out
            save_atomic(*out, meta)
            if trainer.ema is not None:
                out = tm.ema_file(f), weights()
                save_atomic(*out, meta)
            torch_save_atomic(tm.state_file(f), trainer.state_dict())  # last: its presence means all are there
            return out

        # A sharded base runs only with every rank: then they all sample and validate (rank 0 writes).
        previews = make_previews(mp, run, data, trainer, writes=rank == 0) if rank == 0 or sharded else None

        def after_step(n: int):
            if held_out is not None and (rank == 0 or sharded) and (n % run.validate_every == 0 or n == cfg.steps):
                value = trainer.validation_loss(held_out)
                if rank == 0:
                    log.info("supercond: step %d validation loss %.5f", n, value)
            if previews is not None and (n % run.sample_every == 0 or n == cfg.steps):
                with trainer.ema_applied(), torch.no_grad():
                    files = previews.render(n)
                if not files:
                    return None
                events.samples(n, cfg.steps, files)  # to the node that started scripts/train, if any
                return grid(files)
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
                after_step=after_step, keep_last=run.keep_last, writer=rank == 0)
        return last[0], trainer, last[1]


def export_as(export_format: str, model) -> Callable[[dict], dict]:
    """kohya state dict -> the file's state dict in ``export_format``."""
    if export_format == "kohya":
        return lambda sd: sd
    from ...core import lora_export

    layout = fm.diffusers_names(model, NODE)
    return lambda sd: lora_export.export_state_dict(sd, export_format, layout)


def make_previews(mp, run: Run, data: Data, trainer: Trainer, writes: bool = True) -> Previewer | None:
    """The sample renderer, or None when sample_every is 0. ``writes`` False: it samples and saves nothing."""
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
    return Previewer(mp, prompts, encode, fallback, empty, data.latents[0], run.vae, run.stem.parent, run.stem.name,
                     writes)
