"""Single-pass superconditioned sampling inside the real ComfyUI (in-process): real loaders, real
KSampler and SamplerCustomAdvanced, on the eps, v-prediction and flow fixtures.

The fixtures have random weights, so no trained head exists; two heads are built instead:
- a fresh head (copies of the model's tail): must give the cfg 1 image bit for bit;
- an oracle head that, by construction, outputs what the model predicts for the negative
  prompt at the same input: single-pass CFG must then equal two-pass CFG at every scale.
"""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.comfy

SCALES = (2.0, 4.5, 8.0)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float noise: batch-2 vs batch-1 kernels differ in the last bits, and cfg
    amplifies that; the random-weight fixtures' latents reach |x| ~ 100."""
    return (a - b).abs().max().item() <= 5e-5 * b.abs().max().item() + 1e-5


def new_head(model, head="projection"):
    from supercond.nodes.singlepass.nodes import SupercondNewHead

    return SupercondNewHead.execute(model, head).result[0]


def single_pass(model, real_cfg_steps=0, negative="head"):
    from supercond.nodes.singlepass.nodes import SupercondSinglePass

    return SupercondSinglePass.execute(model, real_cfg_steps, negative).result[0]


def oracle(fam, negative):
    """A model whose head returns the diffusion model's own output for ``negative``."""
    from supercond.core.heads import SecondHead
    from supercond.nodes import family as fm
    from supercond.nodes.singlepass import hook

    base = hook.new_head(fam.model, "projection")
    net = fam.model.model.diffusion_model
    tokens, extra = negative[0]
    pooled = extra.get("pooled_output")

    class Oracle(SecondHead):
        def predict_raw(self, cap):
            x = cap.x
            kw = dict(cap.net_kwargs, transformer_options={}, control=None)
            kw["context"] = tokens.to(x).expand(x.shape[0], -1, -1)
            if kw.get("y") is not None:  # as the sampler builds it (SDXL: pooled + size embeddings)
                y = fm.model_conds(fam.model.model, x[:1], {"pooled_output": pooled}, x.device)["y"].cond
                kw["y"] = y.to(x).expand(x.shape[0], -1)
            return net(x, cap.net_args[1], **kw)

    return hook.attach_head(fam.model, Oracle(base.spec, base.final))


class CallCounter:
    """Rows of every diffusion-model call (a module hook: SD3's MMDiT has no DIFFUSION_MODEL wrapper)."""

    def __init__(self, fam):
        self.net = fam.model.model.diffusion_model
        self.rows: list[int] = []

    def __enter__(self):
        self.handle = self.net.register_forward_pre_hook(lambda _m, args: self.rows.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("head", ["projection", "last_block"])
def test_fresh_head_is_cfg1_bit_for_bit_with_one_model_call_per_step(fam, conds, head):
    from comfy_helpers import sample

    pos, neg = conds
    with CallCounter(fam) as calls:
        single = sample(fam, single_pass(new_head(fam.model, head)), pos, neg, cfg=6.0, steps=4)
    assert calls.rows == [1, 1, 1, 1], "expected one diffusion-model call of batch 1 per step"
    assert torch.equal(single, sample(fam, fam.model, pos, neg, cfg=1.0, steps=4))


@pytest.mark.parametrize("head", ["projection", "last_block"])
def test_fresh_head_on_a_lora_patched_tail_is_still_cfg1(fam, conds, head):
    """A LoRA (LoraLoader's patches) on the final projection and the last block: the fresh head copies the
    patched weights, so single-pass stays the patched model's cfg 1 image bit for bit."""
    import comfy.sd
    from comfy_helpers import sample

    from supercond.core.lora import LoRANetwork
    from supercond.nodes import family as fm

    tail = fm.family_of(fam.model, "test").tail
    layers = fm.lora_layers(fam.model, "test")
    names = fm.kohya_names(fam.model)
    dm = fam.model.model.diffusion_model
    for path in tail.final:  # the final projection is never in the trainer's set: add it
        layers |= {names[p]: m for p, m in dm.get_submodule(path).named_modules(prefix=path)
                   if p in names and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    net = LoRANetwork(layers, 4, 4.0, torch.Generator().manual_seed(0))
    for _, mod in net.named_loras():
        mod.up.weight.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    patched, _ = comfy.sd.load_lora_for_models(fam.model, None, net.kohya_state_dict(torch.float32), 1.0, 0.0)
    pos, neg = conds
    cfg1 = sample(fam, patched, pos, neg, cfg=1.0, steps=3)
    assert not torch.equal(cfg1, sample(fam, fam.model, pos, neg, cfg=1.0, steps=3))  # the LoRA does act
    assert torch.equal(sample(fam, single_pass(new_head(patched, head)), pos, neg, cfg=6.0, steps=3), cfg1)


def test_head_that_knows_the_uncond_matches_two_pass_cfg_at_several_scales(fam, conds):
    from comfy_helpers import sample

    pos, neg = conds
    model = single_pass(oracle(fam, neg))
    for scale in SCALES:
        two_pass = sample(fam, fam.model, pos, neg, cfg=scale, steps=2)
        one_pass = sample(fam, model, pos, neg, cfg=scale, steps=2)
        assert close(one_pass, two_pass), (scale, (one_pass - two_pass).abs().max())
    assert not close(two_pass, sample(fam, fam.model, pos, neg, cfg=1.0, steps=2))


def test_real_cfg_steps_switch_at_the_named_step(fam, conds):
    from comfy_helpers import sample

    pos, neg = conds
    model = single_pass(new_head(fam.model), real_cfg_steps=2)
    with CallCounter(fam) as calls:
        sample(fam, model, pos, neg, cfg=5.0, steps=5)
    assert calls.rows == [2, 2, 1, 1, 1]  # cond+uncond batched on steps 0 and 1, one row after
    with CallCounter(fam) as calls:  # heun evaluates at sigma_i and sigma_i+1 (last step: euler)
        sample(fam, model, pos, neg, cfg=5.0, steps=3, sampler="heun")
    assert calls.rows == [2, 2, 2, 1, 1]  # by noise level: only evaluations above sigma_2 are two-pass


def test_negative_prompt_is_replaced_by_the_head_or_used_with_real_cfg(comfy, fixture_checkpoints):
    """Defined behaviour: negative='head' never evaluates the wired negative (any negative gives
    the same image); negative='real_cfg' is exactly stock two-pass CFG with it."""
    from comfy_helpers import encode, load_family, sample

    fam = load_family("eps", fixture_checkpoints)
    pos, empty, blurry = encode(fam, "a red cube"), encode(fam, ""), encode(fam, "blurry, low quality")
    head_model = single_pass(oracle(fam, empty))
    assert torch.equal(sample(fam, head_model, pos, blurry), sample(fam, head_model, pos, empty))
    real = single_pass(new_head(fam.model), negative="real_cfg")
    assert torch.equal(sample(fam, real, pos, blurry), sample(fam, fam.model, pos, blurry))


def test_batch_and_masked_conditioning_work(comfy, fixture_checkpoints):
    from comfy_extras.nodes_mask import SolidMask
    from comfy_helpers import encode, load_family, sample
    from nodes import ConditioningCombine, ConditioningSetArea, ConditioningSetMask

    fam = load_family("eps", fixture_checkpoints)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    model = single_pass(oracle(fam, neg))
    # batch 3: one call of 3 rows per step (counted with a fresh head: the oracle runs the model itself)
    with CallCounter(fam) as calls:
        sample(fam, single_pass(new_head(fam.model)), pos, neg, cfg=5.0, batch=3, steps=2)
    assert calls.rows == [3, 3]
    one = sample(fam, model, pos, neg, cfg=5.0, batch=3, steps=2)
    assert close(one, sample(fam, fam.model, pos, neg, cfg=5.0, batch=3, steps=2))
    # a masked second prompt: the uncond is re-blended with the entries' own masks
    mask = SolidMask().solid(1.0, 64, 64)[0]
    mask[:, :, 32:] = 0
    masked = ConditioningSetMask().append(encode(fam, "a blue sphere"), mask, "default", 1.0)[0]
    both = ConditioningCombine().combine(pos, masked)[0]
    two = sample(fam, fam.model, both, neg, cfg=5.0, steps=3)
    assert close(sample(fam, model, both, neg, cfg=5.0, steps=3), two)
    # an area prompt runs on its crop: with a fresh head the result is still the cfg 1 image
    area = ConditioningSetArea().append(encode(fam, "a blue sphere"), 32, 32, 0, 0, 1.0)[0]
    with_area = ConditioningCombine().combine(pos, area)[0]
    fresh = single_pass(new_head(fam.model))
    assert torch.equal(sample(fam, fresh, with_area, neg, cfg=5.0, steps=2),
                       sample(fam, fam.model, with_area, neg, cfg=1.0, steps=2))


def test_nodes_that_read_the_uncond_get_the_heads(comfy, fixture_checkpoints):
    from comfy_extras.nodes_cfg import CFGZeroStar
    from comfy_helpers import encode, load_family, sample

    fam = load_family("eps", fixture_checkpoints)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    star = CFGZeroStar.execute(fam.model).result[0]
    star_one = CFGZeroStar.execute(single_pass(oracle(fam, neg))).result[0]
    assert close(sample(fam, star_one, pos, neg, cfg=5.0, steps=3),
                 sample(fam, star, pos, neg, cfg=5.0, steps=3))


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_guider_for_sampler_custom_advanced(comfy, fixture_checkpoints, family):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import BasicGuider, CFGGuider, Noise_RandomNoise
    from comfy_helpers import encode, load_family

    from supercond.nodes.singlepass.nodes import SupercondSinglePassGuider

    fam = load_family(family, fixture_checkpoints)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    latent = torch.zeros(1, fam.latent_channels, 8, 8)
    sigmas = comfy.samplers.calculate_sigmas(fam.model.get_model_object("model_sampling"), "simple", 3)
    sampler = comfy.samplers.sampler_object("euler")

    def run(guider):
        return guider.sample(Noise_RandomNoise(3).generate_noise({"samples": latent}), latent, sampler, sigmas,
                             seed=3)

    fresh = SupercondSinglePassGuider.execute(new_head(fam.model), pos, 5.0).result[0]
    assert torch.equal(run(fresh), run(BasicGuider().get_guider(fam.model, pos)[0]))
    with CallCounter(fam) as calls:
        run(SupercondSinglePassGuider.execute(new_head(fam.model), pos, 5.0).result[0])
    assert calls.rows == [1, 1, 1]
    known = SupercondSinglePassGuider.execute(oracle(fam, neg), pos, 5.0).result[0]
    assert close(run(known), run(CFGGuider().get_guider(fam.model, pos, neg, 5.0)[0]))


def test_doubled_output_channels_are_split(comfy, fixture_checkpoints):
    """A UNet trained with 2x output channels (seed 003: cond first) needs no head."""
    import comfy.sd
    from comfy_helpers import Family, encode, load_family, sample

    fam = load_family("eps", fixture_checkpoints)
    sd = {k: v.clone() for k, v in fam.model.model.diffusion_model.state_dict().items()}
    sd["out.2.weight"] = torch.cat([sd["out.2.weight"], 0.5 * sd["out.2.weight"]])
    sd["out.2.bias"] = torch.cat([sd["out.2.bias"], 0.5 * sd["out.2.bias"]])
    two_head = comfy.sd.load_diffusion_model_state_dict(sd)
    assert two_head.model.diffusion_model.out_channels == 8
    dfam = Family("eps2", two_head, fam.clip, fam.vae, 4)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    with CallCounter(dfam) as calls:
        one = sample(dfam, single_pass(two_head), pos, neg, cfg=3.0, steps=3)
    assert calls.rows == [1, 1, 1]
    # cfg 1 with the split model is the plain model's cfg 1; cfg 3 differs (the uncond half is halved)
    assert close(sample(dfam, single_pass(two_head), pos, neg, cfg=1.0, steps=3),
                 sample(fam, fam.model, pos, neg, cfg=1.0, steps=3))
    assert not close(one, sample(fam, fam.model, pos, neg, cfg=1.0, steps=3))


def test_head_file_round_trip_and_misfits(comfy, fixture_checkpoints, tmp_path, monkeypatch):
    import folder_paths
    from comfy_helpers import encode, load_family, sample

    from supercond.core.heads import read_head_file, save_head
    from supercond.nodes.singlepass import hook
    from supercond.nodes.singlepass import nodes as nodes_sp

    eps, v, flow = (load_family(n, fixture_checkpoints) for n in ("eps", "v", "flow"))
    folder = tmp_path / "supercond_heads"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, nodes_sp.FOLDER, ([str(folder)], {".safetensors", ".pt"}))
    head = hook.new_head(eps.model, "last_block")
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_head(head, folder / "sd15.safetensors")
    save_head(hook.new_head(flow.model, "projection"), folder / "sd3.safetensors")

    loaded = nodes_sp.SupercondLoadHead.execute(eps.model, "sd15.safetensors").result[0]
    for (k, a), (_, b) in zip(head.state_dict().items(), hook.head_of(loaded).state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert read_head_file(folder / "sd15.safetensors")[0] == head.spec
    pos, neg = encode(eps, "a red cube"), encode(eps, "")
    trained = sample(eps, single_pass(loaded), pos, neg, cfg=5.0, steps=2)
    assert torch.equal(trained, sample(eps, single_pass(hook.attach_head(eps.model, head)), pos, neg, cfg=5.0, steps=2))

    with pytest.raises(ValueError, match="family: the model needs 'SD15', the head has 'SD3'"):
        nodes_sp.SupercondLoadHead.execute(eps.model, "sd3.safetensors")
    with pytest.raises(ValueError, match="prediction: the model needs 'v', the head has 'eps'"):
        nodes_sp.SupercondLoadHead.execute(v.model, "sd15.safetensors")
    torch.save({"w": torch.zeros(2)}, folder / "old.pt")
    with pytest.raises(ValueError, match="not a safetensors file"):
        nodes_sp.SupercondLoadHead.execute(eps.model, "old.pt")
    data = (folder / "sd15.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        nodes_sp.SupercondLoadHead.execute(eps.model, "cut.safetensors")
    assert "not in the supercond_heads folder" in nodes_sp.SupercondLoadHead.validate_inputs(head_name="nope.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, nodes_sp.FOLDER, ([str(tmp_path / "gone")], set()))
    assert "model folder does not exist" in nodes_sp.SupercondLoadHead.validate_inputs(head_name="sd15.safetensors")


def test_single_pass_without_a_head_says_what_to_do(comfy, fixture_checkpoints):
    from comfy_helpers import load_family

    from supercond.nodes.errors import InputError

    fam = load_family("eps", fixture_checkpoints)
    with pytest.raises(InputError, match="SupercondNewHead or SupercondLoadHead"):
        single_pass(fam.model)


@pytest.fixture(params=["eps", "v"])
def unet_fam(request, comfy, fixture_checkpoints):
    """SD1.x only: in ComfyUI 0.3.64 EasyCache hooks the UNet's DIFFUSION_MODEL wrapper, which SD3's MMDiT lacks."""
    from comfy_helpers import load_family

    return load_family(request.param, fixture_checkpoints)


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
def test_single_pass_under_comfys_caches(unet_fam, cache, caplog, monkeypatch):
    """EasyCache skips the diffusion model's forward inside a step, LazyCache whole steps. Under both the
    graph runs, the cache skips steps and the head serves every step that runs. LazyCache decides on the
    guided output, so with a head that knows the uncond the image is two-pass CFG's under the same cache.
    EasyCache decides on the batch's outputs (two-pass batches the uncond in, so its skips differ): there the
    head's output on a skipped step follows the cache's own rule, the input plus the last output-input
    difference, as EasyCache serves the conditional output."""
    import logging

    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from comfy_helpers import encode, sample

    from supercond.nodes.singlepass import hook

    fam = unet_fam
    pos, neg = encode(fam, "a red cube on a table"), encode(fam, "")
    node = EasyCacheNode if cache == "EasyCache" else LazyCacheNode
    served = []  # (input, head output, the last computed input and output) of each step the cache skipped
    remember, recall = hook.RunState.remember, hook.RunState.recall
    last = {}

    def spy_remember(self, uuids, raw, net_input):
        last.update(raw=raw.float().clone(), x=net_input.float().clone())
        return remember(self, uuids, raw, net_input)

    def spy_recall(self, uuids, net_input):
        out = recall(self, uuids, net_input)
        served.append((net_input.float().clone(), out.clone(), dict(last)))
        return out

    monkeypatch.setattr(hook.RunState, "remember", spy_remember)
    monkeypatch.setattr(hook.RunState, "recall", spy_recall)

    def cached(model):
        return node.execute(model, 1.5, 0.2, 1.0, False).result[0]

    with caplog.at_level(logging.INFO):
        one = sample(fam, cached(single_pass(oracle(fam, neg))), pos, neg, cfg=5.0, steps=10)
    skipped = [int(n) for n in re.findall(rf"{cache} - skipped (\d+)/10 steps", caplog.text)]
    used = re.search(r"single-pass: (\d+) model evaluations from one pass \((\d+) of them answered by a cache\), "
                     r"0 with true two-pass CFG", caplog.text)
    assert skipped and skipped[0] > 0 and used, caplog.text[-2000:]
    head_steps, from_cache = int(used[1]), int(used[2])
    assert not close(one, sample(fam, cached(fam.model), pos, neg, cfg=1.0, steps=10))  # guidance acts
    if cache == "EasyCache":  # the model call is skipped inside the step: the head is asked on every step
        assert head_steps == 10 and from_cache == skipped[0] == len(served)
        for x, out, prev in served:
            torch.testing.assert_close(out - x, prev["raw"] - prev["x"], rtol=0, atol=1e-4)
    else:  # the whole step is skipped before the guider: the head runs on the other steps only
        assert head_steps == 10 - skipped[0] and from_cache == 0 == len(served)
        two = sample(fam, cached(fam.model), pos, neg, cfg=5.0, steps=10)
        assert close(one, two), (one - two).abs().max()
