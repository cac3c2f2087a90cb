"""Single-pass superconditioned sampling inside the real ComfyUI (in-process): real loaders, real
KSampler and SamplerCustomAdvanced, on the eps, v-prediction and flow fixtures.

The fixtures have random weights, so no trained head exists; two heads are built instead:
- a fresh head (copies of the model's tail): must give the cfg 1 image bit for bit;
- an oracle head that, by construction, outputs what the model predicts for the negative
  prompt at the same input: single-pass CFG must then equal two-pass CFG at every scale.
"""

from __future__ import annotations

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
    assert "not in the supercond_heads folder" in nodes_sp.SupercondLoadHead.validate_inputs("nope.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, nodes_sp.FOLDER, ([str(tmp_path / "gone")], set()))
    assert "model folder does not exist" in nodes_sp.SupercondLoadHead.validate_inputs("sd15.safetensors")


def test_single_pass_without_a_head_says_what_to_do(comfy, fixture_checkpoints):
    from comfy_helpers import load_family

    from supercond.nodes.errors import InputError

    fam = load_family("eps", fixture_checkpoints)
    with pytest.raises(InputError, match="SupercondNewHead or SupercondLoadHead"):
        single_pass(fam.model)
