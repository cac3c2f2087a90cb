"""Tier A: the head file format (core/heads.py) and the single-pass arithmetic (core/singlepass.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import struct

import pytest
import torch
from torch import nn

from supercond.core import heads, singlepass

SPEC = heads.HeadSpec("SD15", "eps", "out", "projection", 8)


def toy_head(seed: int = 0, width: int = 8, spec: heads.HeadSpec = SPEC) -> heads.SecondHead:
    torch.manual_seed(seed)
    final = nn.Sequential(nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, 4, 3, padding=1))
    return heads.SecondHead(dataclasses.replace(spec, width=width), final)


def test_save_then_load_round_trips_bit_exactly(tmp_path):
    head = toy_head(seed=1)
    with torch.no_grad():
        head.final[2].weight.mul_(torch.pi)  # values no short decimal form survives
    path = heads.save_head(head, tmp_path / "h.safetensors")
    spec, tensors = heads.read_head_file(path)
    assert spec == head.spec
    other = heads.load_state(toy_head(seed=2), tensors)
    for (k, a), (_, b) in zip(head.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
        assert a.dtype == b.dtype


def test_metadata_names_format_version_family_prediction_features_type_and_negatives(tmp_path):
    from safetensors import safe_open

    path = heads.save_head(toy_head(), tmp_path / "h.safetensors")
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md == {"format": "supercond.head", "format_version": "1", "family": "SD15", "prediction": "eps",
                  "features": "out", "head_type": "projection", "width": "8", "reads_negative": "false"}
    old = {k: v for k, v in md.items() if k != "reads_negative"}  # files written before the field
    assert heads.HeadSpec.from_metadata(old) == SPEC and not SPEC.reads_negative
    reads = heads.HeadSpec.from_metadata(md | {"reads_negative": "true"})
    assert reads.reads_negative and reads.misfit(SPEC) is None
    with pytest.raises(heads.HeadFileError, match="reads_negative 'yes'"):
        heads.HeadSpec.from_metadata(md | {"reads_negative": "yes"})


def test_misfit_says_expected_and_found():
    model = heads.HeadSpec("SD3", "flow", "final_layer", "projection", 64)
    msg = SPEC.misfit(model)
    assert "family: the model needs 'SD3', the head has 'SD15'" in msg
    assert "prediction: the model needs 'flow', the head has 'eps'" in msg
    assert "width: the model needs 64, the head has 8" in msg
    assert SPEC.misfit(SPEC) is None


def test_shape_misfit_is_refused_by_name(tmp_path):
    path = heads.save_head(toy_head(width=8), tmp_path / "h.safetensors")
    _, tensors = heads.read_head_file(path)
    with pytest.raises(heads.HeadFileError, match=r"final.0.weight has shape \[8\], the model's head needs \[16\]"):
        heads.load_state(toy_head(width=16), tensors)


@pytest.mark.parametrize("case, expected", [
    ("empty", "not a safetensors file (truncated or empty)"),
    ("pickle", "not a safetensors file"),
    ("truncated", "is truncated"),
    ("corrupt_header", "not a safetensors file or its header is corrupt"),
    ("plain_safetensors", "not a Supercond head"),
    ("future_version", "update Supercond"),
    ("missing", "does not exist"),
])
def test_bad_files_get_clear_messages(tmp_path, case, expected):
    from safetensors.torch import save_file

    good = heads.save_head(toy_head(), tmp_path / "good.safetensors").read_bytes()
    path = tmp_path / f"{case}.safetensors"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "pickle":
        torch.save({"w": torch.zeros(3)}, path)
    elif case == "truncated":
        path.write_bytes(good[: len(good) - 100])
    elif case == "corrupt_header":
        path.write_bytes(good[:8] + b"\xff" * (len(good) - 8))
    elif case == "plain_safetensors":
        save_file({"w": torch.zeros(3)}, str(path))
    elif case == "future_version":
        md = SPEC.to_metadata() | {"format_version": "99"}
        save_file({"w": torch.zeros(3)}, str(path), metadata=md)
    with pytest.raises(heads.HeadFileError) as err:
        heads.read_head_file(path)
    assert expected in str(err.value)


@pytest.mark.parametrize("entry, expected", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "has data_offsets [0]"),
    ({"dtype": "F32", "shape": [4], "data_offsets": None}, "has data_offsets None"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "not [begin, end]"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]}, "not [begin, end]"),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, "has shape '4'"),
    ({"dtype": 7, "shape": [4], "data_offsets": [0, 16]}, "has dtype 7"),
    ([0, 16], "is not described by a JSON object"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}, "is truncated"),
])
def test_malformed_header_entries_get_the_head_file_error(tmp_path, entry, expected):
    """Crafted headers: each is a HeadFileError naming the tensor, never a raw TypeError/IndexError."""
    header = json.dumps({"__metadata__": SPEC.to_metadata(), "final.0.weight": entry}).encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(heads.HeadFileError, match=re.escape(expected)):
        heads.read_head_file(path)


def test_blend_of_one_full_part_is_the_part_bit_for_bit():
    x = torch.randn(2, 4, 8, 8)
    chunk = torch.randn_like(x)
    assert torch.equal(singlepass.blend(x, [(chunk, torch.ones_like(x), None)]), chunk)


def test_blend_weights_areas_and_masks_like_comfy():
    x = torch.zeros(1, 1, 4, 4)
    full = torch.full_like(x, 2.0)
    area = [2, 2, 1, 1]  # 2x2 at offset (1, 1)
    small = torch.full((1, 1, 2, 2), 8.0)
    out = singlepass.blend(x, [(full, torch.ones_like(x), None), (small, torch.full_like(small, 3.0), area)])
    assert out[0, 0, 0, 0].item() == pytest.approx(2.0)
    assert out[0, 0, 1, 1].item() == pytest.approx((2 + 8 * 3) / 4)


def test_step_index_maps_midpoint_evaluations_to_their_step():
    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [singlepass.step_index(sig, s) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5)] == [0, 0, 1, 1, 2, 3, 3]


def test_split_doubled_takes_cond_first():
    out = torch.arange(8.0).view(1, 8, 1, 1)
    cond, uncond = singlepass.split_doubled(out, 4)
    assert cond.flatten().tolist() == [0, 1, 2, 3] and uncond.flatten().tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="expected 8 output channels"):
        singlepass.split_doubled(out[:, :6], 4)
