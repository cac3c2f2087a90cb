"""The evidence model's VAE: an exact codec for the rendered digits in ComfyUI's TAESD format.

The digits are 8x8 images rendered at 64x64 px, so an 8x-downscaling autoencoder exists exactly and
training one would only add error. The weights are set, not learned: the encoder averages each 8x8
cell (three stride-2 2x2 means) and standardizes it into all 4 latent channels; the decoder averages
the channels, undoes TAESD's built-in ``3 tanh(z / 3)`` clamp with a 63-knot piecewise-linear fit
(ReLU units) and upsamples. ComfyUI reads it as a TAESD (``taesd_decoder.1.weight``) both from a
checkpoint's ``first_stage_model.`` keys and through VAELoader; every block's convolutions are zero,
so each block is ReLU(x) = x on the non-negative activations it carries.
"""

from __future__ import annotations

import torch

LATENT_CHANNELS = 4
WIDTH = 64  # TAESD's fixed width
KNOTS = WIDTH - 1  # decoder ReLU units; unit 0 carries the constant 1 for the output bias
SCALE = 0.18215  # TAESD-for-SD1.x's vae_scale: SD1.x's process_latent_in multiplies it back
CLAMP = 3.0  # TAESD decoder's input clamp: 3 tanh(z / 3)

ENCODER_BLOCKS = (1, 3, 4, 5, 7, 8, 9, 11, 12, 13)
ENCODER_DOWN = (2, 6, 10)
DECODER_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)
DECODER_UP_CONVS = (7, 12, 17)


def _zero_blocks(sd: dict[str, torch.Tensor], prefix: str, blocks: tuple[int, ...]) -> None:
    for b in blocks:
        for i in (0, 2, 4):  # Block.conv = conv, ReLU, conv, ReLU, conv
            sd[f"{prefix}.{b}.conv.{i}.weight"] = torch.zeros(WIDTH, WIDTH, 3, 3)
            sd[f"{prefix}.{b}.conv.{i}.bias"] = torch.zeros(WIDTH)


def state_dict(mean: float, std: float, lo: float = -0.1, hi: float = 1.1) -> dict[str, torch.Tensor]:
    """TAESD keys (``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale``, ``vae_shift``). The latent
    the model sees is ``(ink - mean) / std`` in every channel; the decoder is fitted for inks in
    ``[lo, hi]`` (the VAE clamps images to [0, 1] afterwards)."""
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "taesd_encoder", "taesd_decoder"
    # encoder: grey into channel 0 (the input is the image in [0, 1], so it stays non-negative)
    w = torch.zeros(WIDTH, 3, 3, 3)
    w[0, :, 1, 1] = 1 / 3
    sd[f"{enc}.0.weight"], sd[f"{enc}.0.bias"] = w, torch.zeros(WIDTH)
    _zero_blocks(sd, enc, ENCODER_BLOCKS)
    down = torch.zeros(WIDTH, WIDTH, 3, 3)
    down[0, 0, 1:, 1:] = 0.25  # stride 2, padding 1: taps 1 and 2 cover pixels 2i and 2i + 1
    for i in ENCODER_DOWN:
        sd[f"{enc}.{i}.weight"] = down.clone()
    w = torch.zeros(LATENT_CHANNELS, WIDTH, 3, 3)
    w[:, 0, 1, 1] = 1 / std
    sd[f"{enc}.14.weight"], sd[f"{enc}.14.bias"] = w, torch.full((LATENT_CHANNELS,), -mean / std)

    # decoder: m = mean of the clamped channels; unit k = ReLU(m - t_k); output = sum_k a_k unit_k + c
    m_lo, m_hi = (CLAMP * torch.tanh(torch.tensor((v - mean) / std) / CLAMP) for v in (lo, hi))
    knots = torch.linspace(float(m_lo), float(m_hi), KNOTS + 1)[:-1]
    w = torch.zeros(WIDTH, LATENT_CHANNELS, 3, 3)
    w[:KNOTS, :, 1, 1] = 1 / LATENT_CHANNELS
    bias = torch.zeros(WIDTH)
    bias[:KNOTS] = -knots
    bias[KNOTS] = 1.0  # the constant unit
    sd[f"{dec}.1.weight"], sd[f"{dec}.1.bias"] = w, bias
    _zero_blocks(sd, dec, DECODER_BLOCKS)
    eye = torch.zeros(WIDTH, WIDTH, 3, 3)
    eye[torch.arange(WIDTH), torch.arange(WIDTH), 1, 1] = 1.0
    for i in DECODER_UP_CONVS:
        sd[f"{dec}.{i}.weight"] = eye.clone()
    coef = _fit_inverse(knots, float(m_lo), float(m_hi), mean, std)
    w = torch.zeros(3, WIDTH, 3, 3)
    w[:, :, 1, 1] = coef
    sd[f"{dec}.19.weight"], sd[f"{dec}.19.bias"] = w, torch.zeros(3)
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(SCALE), torch.tensor(0.0)
    return sd


def _fit_inverse(knots: torch.Tensor, m_lo: float, m_hi: float, mean: float, std: float) -> torch.Tensor:
    """Least-squares weights of the 63 ReLU units and the constant unit for ink(m), the inverse of
    m = 3 tanh(((ink - mean) / std) / 3), on a fine grid of m."""
    m = torch.linspace(m_lo, m_hi, 4001, dtype=torch.float64)
    ink = mean + std * CLAMP * torch.atanh(m / CLAMP)
    units = torch.cat([torch.relu(m[:, None] - knots.double()[None]), torch.ones(len(m), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(units, ink[:, None]).solution[:, 0]
    return coef.float()
