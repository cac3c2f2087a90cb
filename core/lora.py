"""Activation-path LoRA for Linear and Conv2d layers: ``y = W x + (alpha/rank) * up(down(x))``.

Kohya conventions: ``down`` is Kaiming-uniform, ``up`` starts at zero (so the initial delta is
exactly zero); a Conv2d gets a ``down`` conv with the layer's kernel, stride and padding and a 1x1
``up`` conv, and both keep their 4-D weights in the file. Layers are reached with forward hooks
that ``LoRANetwork.attached`` installs and always removes: nothing outside the context changes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import skip_init

# Which layers of a UNet/MMDiT get a LoRA (nodes.family.lora_layers): all but embeddings and in/out, or the
# transformer blocks only (kohya's default).
LAYER_SETS = ("all", "transformer")


class LoRAError(ValueError):
    """Bad LoRA input or file: the message says what was wrong."""


class LoRAModule(nn.Module):
    def __init__(self, layer: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        # skip_init: the default init would draw from (and advance) the global RNG.
        if isinstance(layer, nn.Conv2d):
            self.down = skip_init(nn.Conv2d, layer.in_channels, rank, layer.kernel_size, layer.stride,
                                  layer.padding, layer.dilation, bias=False)
            self.up = skip_init(nn.Conv2d, rank, layer.out_channels, 1, bias=False)
        elif isinstance(layer, nn.Linear):
            self.down = skip_init(nn.Linear, layer.in_features, rank, bias=False)
            self.up = skip_init(nn.Linear, rank, layer.out_features, bias=False)
        else:
            raise LoRAError(f"LoRA supports Linear and Conv2d layers, not {type(layer).__name__}")
        self.rank = rank
        self.alpha = float(alpha)
        bound = 1.0 / math.sqrt(self.down.weight[0].numel())  # = kaiming_uniform_(a=sqrt(5))
        with torch.no_grad():
            self.down.weight.copy_(torch.rand(self.down.weight.shape, generator=generator) * 2 * bound - bound)
            self.up.weight.zero_()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled delta ``scale * up(down(x))``, computed in ``x``'s dtype (the weights are cast, as
        autocast would: a cast of the rank-wide weights is cheaper than two of the activations)."""
        if isinstance(self.up, nn.Conv2d):
            h = self.down._conv_forward(x, self.down.weight.to(x.dtype), None)
            return F.conv2d(h * self.scale, self.up.weight.to(x.dtype))
        return F.linear(F.linear(x, self.down.weight.to(x.dtype)) * self.scale, self.up.weight.to(x.dtype))


class LoRANetwork(nn.Module):
    """LoRA modules keyed by their file prefix (e.g. ``lora_unet_down_blocks_0_..._to_q``)."""

    def __init__(self, layers: Mapping[str, nn.Module], rank: int, alpha: float, generator: torch.Generator,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rank < 1:
            raise LoRAError(f"rank must be >= 1, got {rank}")
        if not layers:
            raise LoRAError("no Linear or Conv2d layer to put a LoRA on")
        self.rank, self.alpha = rank, float(alpha)
        self.layers = dict(layers)
        self.loras = nn.ModuleDict()
        # Init from a private generator, in a fixed order, so a seed gives the same LoRA everywhere.
        for key in sorted(self.layers):
            mod = LoRAModule(self.layers[key], rank, alpha, generator)
            self.loras[_safe(key)] = mod.to(device=device, dtype=dtype)
        self._names = {_safe(k): k for k in self.layers}

    def named_loras(self) -> Iterator[tuple[str, LoRAModule]]:
        for safe, mod in self.loras.items():
            yield self._names[safe], mod

    @contextmanager
    def attached(self) -> Iterator[LoRANetwork]:
        """Forward hooks adding each LoRA to its layer's output, removed on exit (also on error)."""
        handles = []
        try:
            for key, mod in self.named_loras():
                handles.append(self.layers[key].register_forward_hook(_hook(mod)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """``<key>.lora_down.weight``, ``<key>.lora_up.weight`` (4-D for convs) and scalar ``<key>.alpha``."""
        out = {}
        for key, mod in self.named_loras():
            out[f"{key}.lora_down.weight"] = mod.down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = mod.up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(mod.alpha, dtype=dtype)
        return out

    def load_kohya_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load weights saved by ``kohya_state_dict``; every key must match (rank and shapes too)."""
        with torch.no_grad():
            for key, mod in self.named_loras():
                for part, p in (("lora_down", mod.down.weight), ("lora_up", mod.up.weight)):
                    name = f"{key}.{part}.weight"
                    if name not in sd:
                        raise LoRAError(f"the checkpoint has no {name}: it was trained on another model or layer set")
                    if tuple(sd[name].shape) != tuple(p.shape):
                        raise LoRAError(f"{name} has shape {list(sd[name].shape)}, expected {list(p.shape)} "
                                        "(a different rank?)")
                    p.copy_(sd[name].to(p.dtype))


def _hook(mod: LoRAModule):
    linear = isinstance(mod.up, nn.Linear)

    def hook(_layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if linear and x.dtype == output.dtype:
            # Profiled: scaling and adding the layer-wide delta as separate ops cost more than the rank-r
            # matmuls themselves; addmm adds the up projection into the output with the scale as alpha.
            h = F.linear(x, mod.down.weight.to(x.dtype))
            out = output.reshape(-1, output.shape[-1])
            return torch.addmm(out, h.reshape(-1, mod.rank), mod.up.weight.to(x.dtype).t(), alpha=mod.scale
                               ).view(output.shape)
        return output + mod(x).to(output.dtype)

    return hook


def _safe(key: str) -> str:
    return key.replace(".", "__")  # ModuleDict keys may not contain dots


def kohya_metadata(rank: int, alpha: float, steps: int, config: Mapping[str, object],
                   base_model: str) -> dict[str, str]:
    """The ``ss_*`` fields kohya-aware tools read, plus our full training config."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_steps": str(steps),
        "ss_learning_rate": str(config.get("learning_rate", "")),
        "ss_base_model_version": base_model,
        "ss_training_comment": "trained with Supercond SupercondTrainLoRA",
        "supercond_config": json.dumps(dict(config), sort_keys=True, default=str),
    }
