"""export_format (core/lora_export.py): the LoRA we train, written in diffusers' key names, must give the
same weight delta wherever it is loaded.

- Pure: alpha/rank is folded into B (diffusers files carry no alpha), a fused layer of ours is split by
  rows of B, keys are spelled as each loader reads them, bad input is refused.
- ComfyUI (in-process, the fixtures): ``comfy.sd.load_lora_for_models`` patches the same weights with
  the same values from the diffusers file as from our kohya file (SD1.x, SDXL, SD3, Flux); PEFT's own
  spelling loses a UNet's attention layers there; families without a diffusers mapping are refused.
- diffusers (the real library, random-weight models with the fixtures' block structure, no download):
  the pipeline's ``load_lora_weights`` + ``fuse_lora`` changes exactly our layers, by our deltas; our
  kohya file through diffusers' own kohya converter (an independent name mapping) gives the same.
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from supercond.core.lora import LoRAError
from supercond.core.lora_export import (
    EXPORT_FORMATS,
    DiffusersLayout,
    DiffusersTarget,
    export_state_dict,
    to_diffusers,
)

log = logging.getLogger(__name__)

RANK, ALPHA = 4, 3.0  # scale 0.75: a dropped or doubled scale shows; fp16 rounds B * 0.75
FP16_REL = 1e-3  # of the largest |delta| of a layer: B * scale rounded to fp16 (2^-11 relative)
FP32_REL = 1e-5
NODE = "SupercondTrainLoRA"


def delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A in float32, [out, in * kh * kw]."""
    return scale * up.float().flatten(1) @ down.float().flatten(1)


def kohya_layer(prefix: str, out: int, inp: int, kernel: tuple[int, ...] = (), seed: int = 0,
                alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ones = (1,) * len(kernel)
    return {f"{prefix}.lora_down.weight": torch.randn(RANK, inp, *kernel, generator=g).half(),
            f"{prefix}.lora_up.weight": (torch.randn(out, RANK, *ones, generator=g) * 0.1).half(),
            f"{prefix}.alpha": torch.tensor(alpha, dtype=torch.float16)}


def rows_of(rows: tuple[tuple[int, int], ...] | None, n: int) -> list[int]:
    return list(range(n)) if rows is None else [i for s, c in rows for i in range(s, s + c)]


# -- pure conversion -------------------------------------------------------------------------------

UNET_LAYOUT = DiffusersLayout("unet", {
    "lora_unet_a_attn1_to_q": (DiffusersTarget("a.attn1.to_q"),),
    "lora_unet_a_attn2_to_out_0": (DiffusersTarget("a.attn2.to_out.0"),),
    "lora_unet_a_ff_net_0_proj": (DiffusersTarget("a.ff.net.0.proj"),),
    "lora_unet_a_conv1": (DiffusersTarget("a.conv1"),),
})


def unet_lora() -> dict[str, torch.Tensor]:
    return {**kohya_layer("lora_unet_a_attn1_to_q", 8, 6, seed=1),
            **kohya_layer("lora_unet_a_attn2_to_out_0", 8, 8, seed=2),
            **kohya_layer("lora_unet_a_ff_net_0_proj", 16, 8, seed=3),
            **kohya_layer("lora_unet_a_conv1", 8, 4, (3, 3), seed=4)}


UNET_KEYS = {  # (diffusers style, peft style) stems
    "a.attn1.to_q": ("unet.a.attn1.processor.to_q_lora.{}.weight", "unet.a.attn1.to_q.lora_{}.weight"),
    "a.attn2.to_out.0": ("unet.a.attn2.processor.to_out_lora.{}.weight",
                         "unet.a.attn2.to_out.0.lora_{}.weight"),
    "a.ff.net.0.proj": ("unet.a.ff.net.0.proj.lora.{}.weight", "unet.a.ff.net.0.proj.lora_{}.weight"),
    "a.conv1": ("unet.a.conv1.lora.{}.weight", "unet.a.conv1.lora_{}.weight"),
}


@pytest.mark.parametrize("style", ["diffusers", "peft"])
@pytest.mark.parametrize("dtype, rel", [(None, FP16_REL), (torch.float32, FP32_REL)])
def test_alpha_is_folded_into_b_and_the_delta_is_ours(style, dtype, rel):
    sd = unet_lora()
    out = export_state_dict(sd, style, UNET_LAYOUT, dtype)
    names = {"down": "A", "up": "B"} if style == "peft" else {"down": "down", "up": "up"}
    assert len(out) == 8 and all("lora" in k and "alpha" not in k for k in out)  # diffusers refuses others
    for prefix, (target,) in UNET_LAYOUT.targets.items():
        stem = UNET_KEYS[target.path][style == "peft"]
        a, b = out[stem.format(names["down"])], out[stem.format(names["up"])]
        assert a.dtype == b.dtype == (dtype or torch.float16)
        assert torch.equal(a.float(), sd[f"{prefix}.lora_down.weight"].float())  # A is ours unchanged
        ours = delta(sd[f"{prefix}.lora_down.weight"], sd[f"{prefix}.lora_up.weight"], ALPHA / RANK)
        err = (delta(a, b, 1.0) - ours).abs().max() / ours.abs().max()
        assert err <= rel, (prefix, float(err))
        assert b.shape == sd[f"{prefix}.lora_up.weight"].shape  # convs keep their 4-D [out, r, 1, 1]


def test_a_file_without_alpha_keeps_scale_one():
    sd = kohya_layer("lora_unet_a_conv1", 8, 4, seed=4)
    del sd["lora_unet_a_conv1.alpha"]
    out = to_diffusers(sd, UNET_LAYOUT, "peft")
    assert torch.equal(out["unet.a.conv1.lora_B.weight"], sd["lora_unet_a_conv1.lora_up.weight"])


def test_transformers_take_peft_names_and_fused_layers_split_by_rows():
    """SD3's qkv -> to_q, to_k, to_v (each its rows of B, all of A); a swapped adaLN -> its halves swapped."""
    layout = DiffusersLayout("transformer", {
        "lora_unet_b_qkv": tuple(DiffusersTarget(f"b.attn.to_{n}", ((i * 4, 4),))
                                 for i, n in enumerate("qkv")),
        "lora_unet_b_ada": (DiffusersTarget("b.norm1_context.linear", ((4, 4), (0, 4))),),
    })
    sd = {**kohya_layer("lora_unet_b_qkv", 12, 6, seed=5), **kohya_layer("lora_unet_b_ada", 8, 6, seed=6)}
    for style in ("diffusers", "peft"):  # a transformer is spelled the same in both
        out = to_diffusers(sd, layout, style, torch.float32)
        assert sorted(out) == sorted(f"transformer.{t.path}.lora_{x}.weight" for ts in layout.targets.values()
                                     for t in ts for x in "AB")
        for prefix, targets in layout.targets.items():
            ours = delta(sd[f"{prefix}.lora_down.weight"], sd[f"{prefix}.lora_up.weight"], ALPHA / RANK)
            for t in targets:
                a, b = out[f"transformer.{t.path}.lora_A.weight"], out[f"transformer.{t.path}.lora_B.weight"]
                want = ours[rows_of(t.rows, ours.shape[0])]
                assert (delta(a, b, 1.0) - want).abs().max() <= FP32_REL * want.abs().max(), t.path
    # safetensors refuses tensors that share memory (with each other or with our file's)
    pointers = [v.untyped_storage().data_ptr() for v in [*to_diffusers(sd, layout).values(), *sd.values()]]
    assert len(set(pointers)) == len(pointers)


def test_kohya_is_written_unchanged_and_bad_input_is_refused():
    sd = unet_lora()
    assert export_state_dict(sd, "kohya") == sd and EXPORT_FORMATS == ("kohya", "diffusers", "peft")
    with pytest.raises(LoRAError, match="unknown export_format 'onnx'"):
        export_state_dict(sd, "onnx", UNET_LAYOUT)
    with pytest.raises(LoRAError, match="needs the model's diffusers layout"):
        export_state_dict(sd, "diffusers")
    with pytest.raises(LoRAError, match="lora_unet_a_conv1 has no diffusers name"):
        to_diffusers(sd, DiffusersLayout("unet", {k: v for k, v in UNET_LAYOUT.targets.items()
                                                  if "conv" not in k}))
    with pytest.raises(LoRAError, match="rows 6..10 are outside its 8 outputs"):
        bad_rows = {"lora_unet_a_conv1": (DiffusersTarget("a.conv1", ((6, 4),)),)}
        to_diffusers(sd, DiffusersLayout("unet", {**UNET_LAYOUT.targets, **bad_rows}))
    overlap = (DiffusersTarget("a.conv1", ((0, 4),)), DiffusersTarget("a.conv2", ((2, 6),)))
    gap = (DiffusersTarget("a.conv1", ((0, 4),)), DiffusersTarget("a.conv2", ((6, 2),)))
    for targets, msg in ((overlap, "leave out 0 of its 8 outputs and take 2 more than once"),
                         (gap, "leave out 2 of its 8 outputs and take 0 more than once")):
        with pytest.raises(LoRAError, match=msg):
            to_diffusers(sd, DiffusersLayout("unet", {**UNET_LAYOUT.targets, "lora_unet_a_conv1": targets}))
    with pytest.raises(LoRAError, match="not a kohya LoRA key"):
        to_diffusers({**sd, "lora_unet_a_conv1.dora_scale": torch.ones(1)}, UNET_LAYOUT)
    with pytest.raises(LoRAError, match="no lora_down or no lora_up weight for lora_unet_a_conv1"):
        to_diffusers({k: v for k, v in sd.items() if k != "lora_unet_a_conv1.lora_up.weight"}, UNET_LAYOUT)


# -- ComfyUI ---------------------------------------------------------------------------------------

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


def load_unet_only(name: str, models_dir, fixture_checkpoints):
    """The family's MODEL alone (no CLIP or VAE: SDXL's CLIP-G alone is gigabytes)."""
    import comfy.sd

    from supercond.tools.fixture_models.registry import file_path

    if name == "sd15":
        from comfy_helpers import load_family

        return load_family("eps", fixture_checkpoints).model
    if name == "flux":
        return comfy.sd.load_diffusion_model(str(file_path(models_dir, name)))
    return comfy.sd.load_checkpoint_guess_config(str(file_path(models_dir, name)), output_vae=False,
                                                 output_clip=False)[0]


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, comfy, models_dir, fixture_checkpoints):
    """A family's MODEL, our kohya state dict for it (random B), its diffusers layout and the weights ComfyUI
    patches from the kohya file; one family at a time."""
    from supercond.core.lora import LoRANetwork
    from supercond.nodes import family as fm

    model = load_unet_only(request.param, models_dir, fixture_checkpoints)
    net = LoRANetwork(fm.lora_layers(model, NODE), RANK, ALPHA, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: give it the size of a trained one
        for _, mod in net.named_loras():
            mod.up.weight.copy_(torch.randn(mod.up.weight.shape, generator=g) * 0.05)
    kohya = net.kohya_state_dict(torch.float16)
    return SimpleNamespace(name=request.param, model=model, kohya=kohya,
                           layout=fm.diffusers_names(model, NODE), kohya_patched=comfy_patched(model, kohya))


def comfy_patched(model, sd: dict) -> dict[str, torch.Tensor]:
    """ComfyUI weight key -> the weight its stock LoRA loading gives (computed, the model left as it was)."""
    import comfy.lora
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    base = model.model.state_dict()
    return {k: comfy.lora.calculate_weight(p, base[k].float().clone(), k) for k, p in patched.patches.items()}


@pytest.mark.comfy
@pytest.mark.parametrize("dtype, rel", [(None, FP16_REL), (torch.float32, FP32_REL)])
def test_comfyui_loads_the_diffusers_file_as_the_kohya_file(trained, dtype, rel):
    base = trained.model.model.state_dict()
    want = trained.kohya_patched
    got = comfy_patched(trained.model, to_diffusers(trained.kohya, trained.layout, "diffusers", dtype))
    assert len(want) == len(trained.kohya) // 3
    assert sorted(got) == sorted(want)
    worst = 0.0
    for key, w in want.items():
        d = (w - base[key].float()).abs().max()
        assert d > 0, key
        worst = max(worst, float((got[key] - w).abs().max() / d))
    log.info("%s %s: max |W_diffusers - W_kohya| / max |delta| = %.2e", trained.name, dtype, worst)
    assert worst <= rel


@pytest.mark.comfy
def test_every_layer_the_layout_names_is_split_into_whole_rows(trained):
    """Trained or not, each named layer's diffusers modules take each of its outputs once; a layer with two
    whole-weight names (SDXL's label_emb: add_embedding and class_embedding) is an alias and has no name."""
    from supercond.core.lora_export import check_rows
    from supercond.nodes import family as fm

    modules = dict(trained.model.model.diffusion_model.named_modules())
    weights = {prefix: getattr(modules.get(path), "weight", None)  # ComfyUI's maps name absent layers too
               for path, prefix in fm.kohya_names(trained.model).items()}
    checked = 0
    for prefix, targets in trained.layout.targets.items():
        if isinstance(weights.get(prefix), torch.Tensor):
            check_rows(prefix, [t.rows for t in targets], weights[prefix].shape[0])
            checked += 1
    assert checked >= len(trained.kohya) // 3
    assert not any("label_emb" in p for p in trained.layout.targets)


@pytest.mark.comfy
def test_comfyui_drops_unet_attention_in_peft_names(comfy, fixture_checkpoints):
    """Why the "diffusers" spelling exists: ComfyUI 0.3.64 reads a UNet's attention projections only by
    their attention-processor names. If this fails, ComfyUI reads PEFT names now: update lora_export's
    docs."""
    from comfy_helpers import load_family

    from supercond.core.lora import LoRANetwork
    from supercond.nodes import family as fm

    model = load_family("eps", fixture_checkpoints).model
    kohya = LoRANetwork(fm.lora_layers(model, NODE), RANK, ALPHA, torch.Generator()).kohya_state_dict()
    layout = fm.diffusers_names(model, NODE)
    attn = re.compile(r"\.attn\d\.to_(q|k|v|out)")
    got = comfy_patched(model, to_diffusers(kohya, layout, "peft"))
    everything = comfy_patched(model, kohya)
    assert sorted(got) == sorted(k for k in everything if not attn.search(k)) and len(got) < len(everything)


@pytest.mark.comfy
def test_families_without_a_diffusers_mapping_are_refused(comfy, models_dir):
    import comfy.sd

    from supercond.nodes import family as fm
    from supercond.nodes.errors import InputError
    from supercond.tools.fixture_models.registry import file_path

    wan = comfy.sd.load_diffusion_model(str(file_path(models_dir, "wan21")))
    msg = (f"{NODE}: diffusers export is not available for Wan 2.1 T2V models; use export_format kohya. "
           "Diffusers export supports: SD1.x, SDXL, SD3, Flux")
    with pytest.raises(InputError, match=re.escape(msg)):
        fm.diffusers_names(wan, NODE)


# -- diffusers ---------------------------------------------------------------------------------------

def need_diffusers():
    from conftest import require

    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        require("diffusers and peft", False, "pip install -r requirements-dev.txt")


def diffusers_pipeline(name: str):
    """A pipeline around a random-weight model with the fixture's block structure (no text encoders,
    tokenizers or VAE: load_lora_weights only needs the denoiser)."""
    import diffusers as df

    from supercond.tools.fixture_models import flux, sd, sdxl

    torch.manual_seed(0)
    if name == "sd15":
        c = sd.SD15_UNET
        unet = df.UNet2DConditionModel(
            sample_size=c["image_size"], in_channels=c["in_channels"], out_channels=c["out_channels"],
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            block_out_channels=(c["model_channels"],), layers_per_block=c["num_res_blocks"][0],
            cross_attention_dim=c["context_dim"], attention_head_dim=c["num_heads"],
            use_linear_projection=False)
        return df.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                          scheduler=df.DDIMScheduler(steps_offset=1, clip_sample=False),
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    if name == "sdxl":
        c = sdxl.SDXL_UNET
        ch = c["model_channels"]
        unet = df.UNet2DConditionModel(
            sample_size=c["image_size"], in_channels=c["in_channels"], out_channels=c["out_channels"],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(ch, ch, ch), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            reverse_transformer_layers_per_block=((1, 1, 1), (1, 1, 1), (1, 1, 1)),
            cross_attention_dim=c["context_dim"], attention_head_dim=ch // c["num_head_channels"],
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=c["adm_in_channels"])
        # diffusers gives the middle block the last level's depth (10); the fixture's has 1.
        mid = unet.mid_block.attentions[0]
        mid.transformer_blocks = mid.transformer_blocks[:c["transformer_depth_middle"]]
        return df.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                            tokenizer_2=None, unet=unet,
                                            scheduler=df.EulerDiscreteScheduler(), add_watermarker=False)
    if name == "sd3":
        model = df.SD3Transformer2DModel(
            sample_size=32, patch_size=sd.SD3_MMDIT["patch_size"], in_channels=sd.SD3_MMDIT["in_channels"],
            num_layers=sd.SD3_DEPTH, attention_head_dim=64, num_attention_heads=sd.SD3_DEPTH,
            joint_attention_dim=4096, caption_projection_dim=sd.SD3_HIDDEN,
            pooled_projection_dim=sd.SD3_MMDIT["adm_in_channels"], out_channels=sd.SD3_MMDIT["out_channels"],
            pos_embed_max_size=sd.SD3_POS_EMBED_MAX)
        return df.StableDiffusion3Pipeline(transformer=model, scheduler=df.FlowMatchEulerDiscreteScheduler(),
                                           vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                           tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    c = flux.FLUX_DIT
    model = df.FluxTransformer2DModel(
        patch_size=1, in_channels=c["in_channels"] * c["patch_size"] ** 2, num_layers=c["depth"],
        num_single_layers=c["depth_single_blocks"], attention_head_dim=c["hidden_size"] // c["num_heads"],
        num_attention_heads=c["num_heads"], joint_attention_dim=c["context_in_dim"],
        pooled_projection_dim=c["vec_in_dim"], guidance_embeds=c["guidance_embed"],
        axes_dims_rope=tuple(c["axes_dim"]))
    return df.FluxPipeline(transformer=model, scheduler=df.FlowMatchEulerDiscreteScheduler(), vae=None,
                           text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def denoiser(pipe) -> nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.fixture(scope="module")
def pipe(trained):
    """The family's diffusers pipeline, built once (Flux's takes half a minute); tests leave its weights as
    they found them."""
    need_diffusers()
    return diffusers_pipeline(trained.name)


def diffusers_deltas(pipe, sd: dict, paths: set[str]) -> dict[str, torch.Tensor]:
    """module path -> W_after - W_before of every weight load_lora_weights + fuse_lora changed (those
    outside ``paths`` too: they would be a mistake)."""
    net = denoiser(pipe)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    try:
        pipe.load_lora_weights(dict(sd))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # fused weights stay; the wrappers go, the parameter names come back
        after = dict(net.named_parameters())
        assert sorted(after) == sorted(before)
        changed = {n.removesuffix(".weight"): (after[n].detach() - w).flatten(1)
                   for n, w in before.items() if not torch.equal(after[n], w)}
    finally:
        pipe.unload_lora_weights()
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(before[n])
    assert paths <= set(changed), sorted(paths - set(changed))[:5]
    return changed


def our_deltas(kohya: dict, layout: DiffusersLayout) -> dict[str, torch.Tensor]:
    """diffusers module path -> the delta our kohya file gives it (float32, from the file itself)."""
    out = {}
    for prefix, targets in layout.targets.items():
        if f"{prefix}.lora_down.weight" not in kohya:
            continue
        d = delta(kohya[f"{prefix}.lora_down.weight"], kohya[f"{prefix}.lora_up.weight"],
                  float(kohya[f"{prefix}.alpha"]) / RANK)
        for t in targets:
            out[t.path] = d[rows_of(t.rows, d.shape[0])]
    return out


def worst_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:5]
    return max(float((got[p] - w).abs().max() / w.abs().max()) for p, w in want.items())


@pytest.mark.comfy
@pytest.mark.parametrize("style", ["diffusers", "peft"])
def test_diffusers_fuses_our_deltas(trained, pipe, style):
    want = our_deltas(trained.kohya, trained.layout)
    assert {"to_q", "ff", "to_out"} <= {m for p in want for m in re.findall(r"to_q|ff|to_out", p)}
    got = diffusers_deltas(pipe, to_diffusers(trained.kohya, trained.layout, style), set(want))
    rel = worst_rel(got, want)
    log.info("%s %s: max |delta_diffusers - delta_ours| / max |delta| = %.2e (max abs %.2e)", trained.name,
             style, rel, max(float((got[p] - w).abs().max()) for p, w in want.items()))
    assert rel <= FP16_REL


@pytest.mark.comfy
@pytest.mark.parametrize("trained", [f for f in FAMILIES if f != "sd3"], indirect=True)
def test_diffusers_reads_our_kohya_file_with_its_own_converter(trained, pipe):
    """diffusers maps kohya names itself (and reads alpha): an independent check of our names (SD3 not:
    diffusers has no kohya converter for SD3 LoRAs)."""
    want = our_deltas(trained.kohya, trained.layout)
    rel = worst_rel(diffusers_deltas(pipe, trained.kohya, set(want)), want)
    log.info("%s kohya through diffusers: max rel delta difference %.2e", trained.name, rel)
    # SD passes alpha to PEFT; diffusers' Flux converter folds it into the fp16 weights itself.
    assert rel <= (FP32_REL if trained.layout.component == "unet" else FP16_REL)


def small_clip(with_projection: bool) -> nn.Module:
    """A 2-layer transformers CLIP text model: the layer names of CLIP-L / CLIP-G at a test's size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32, vocab_size=1000)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def text_encoder_lora(encoders: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """kohya text-encoder layers (lora_te_ for SD1.x, lora_te1_/lora_te2_ for SDXL) on every projection of
    ``encoders`` (pipeline component -> model)."""
    prefix = {"text_encoder": "lora_te_"} if len(encoders) == 1 else {"text_encoder": "lora_te1_",
                                                                      "text_encoder_2": "lora_te2_"}
    out, seed = {}, 10
    for comp, te in encoders.items():
        for path, mod in getattr(te, "text_model", te).encoder.named_modules():
            if isinstance(mod, nn.Linear):
                name = f"{prefix[comp]}text_model_encoder_{path.replace('.', '_')}"
                out |= kohya_layer(name, mod.out_features, mod.in_features, seed=seed)
                seed += 1
    return out


@pytest.mark.comfy
@pytest.mark.parametrize("trained", ["sd15", "sdxl"], indirect=True)
@pytest.mark.parametrize("style", ["diffusers", "peft"])
def test_diffusers_fuses_our_text_encoder_deltas(trained, pipe, style):
    """A file with the UNet's and the text encoders' layers: diffusers puts each delta on its own text
    encoder (text_encoder, text_encoder_2 for SDXL's CLIP-G) and the UNet's are still right beside them."""
    from supercond.core.lora_export import text_encoder_module

    encoders = {"text_encoder": small_clip(False)}
    if trained.name == "sdxl":
        encoders["text_encoder_2"] = small_clip(True)
    te = text_encoder_lora(encoders)
    want = {}
    for prefix in {k.rsplit(".", 2)[0] for k in te if k.endswith(".lora_up.weight")}:
        comp, path = text_encoder_module(prefix)
        if not hasattr(encoders[comp], "text_model"):  # transformers 5 dropped the level; diffusers strips it
            path = path.removeprefix("text_model.")
        want[f"{comp}.{path}"] = delta(te[f"{prefix}.lora_down.weight"], te[f"{prefix}.lora_up.weight"], ALPHA / RANK)
    assert len(want) == 12 * len(encoders)  # 2 layers x q, k, v, out, fc1, fc2
    before = {f"{c}.{n}": p.detach().clone() for c, m in encoders.items() for n, p in m.named_parameters()}
    pipe.register_modules(**encoders)
    try:
        unet = diffusers_deltas(pipe, to_diffusers(trained.kohya | te, trained.layout, style),
                                set(our_deltas(trained.kohya, trained.layout)))
        after = {f"{c}.{n}": p.detach() for c, m in encoders.items() for n, p in m.named_parameters()}
    finally:
        pipe.register_modules(**dict.fromkeys(encoders))
    got = {n.removesuffix(".weight"): (after[n] - w).flatten(1) for n, w in before.items()
           if not torch.equal(after[n], w)}
    assert worst_rel(got, want) <= FP16_REL
    assert worst_rel(unet, our_deltas(trained.kohya, trained.layout)) <= FP16_REL
