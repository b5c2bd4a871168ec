#!/usr/bin/env python3
"""Goldens for cached attention (StreamV2V's feature bank) on the tiny sd-turbo UNet.

A torch rendering of the formula docs/ALGORITHM.md §5e states, installed as the attention
processor of every self-attention layer (`attn1`) of diffusers' UNet2DConditionModel:

    out = softmax(Q [K; K_1; ...; K_F]^T / sqrt(d)) [V; V_1; ...; V_F]

with (K_j, V_j) the banked keys and values of this layer, F = max_frames frames of zeros at
first; after call c (from 0), when c % interval == 0, each layer drops its oldest frame and appends
this call's K, V. Rows are banked row by row.

Writes tests/fixtures/golden/cached_attention.safetensors:
  sample_<c> [2, 4, 8, 8], timesteps_<c> [2], text [2, 77, 32]  the inputs of 6 calls
  plain_<c>                                                       the UNet without a bank
  out_f<F>_i<I>_<c>                                               with a bank of F frames
                                                                  refreshed every I calls, for
                                                                  (F, I) in (1, 1), (2, 1), (3, 2)

The outputs are rendered in f64 and stored as f32: on some of these inputs the f32 UNet is only
determined to a few 1e-4 (call 0: torch's own f32 run lands 2.3e-4 from the f64 rendering on one
x86 machine and 4.5e-4 on another, by summation order alone), so an f32 golden would carry one
machine's rounding into every test that reads it.

Needs torch and diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import _common

CALLS = 6
SETTINGS = [(1, 1), (2, 1), (3, 2)]


class Bank:
    def __init__(self, frames: int, interval: int):
        self.frames, self.interval = frames, interval
        self.calls = 0
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def commit(self) -> None:
        refresh = self.calls % self.interval == 0
        self.calls += 1
        for layer, (k, v) in self.fresh.items():
            bk, bv = self.layers.get(layer) or (
                torch.zeros(k.shape[0], self.frames, *k.shape[1:]),
                torch.zeros(v.shape[0], self.frames, *v.shape[1:]),
            )
            if refresh:
                bk = torch.cat([bk[:, 1:], k[:, None]], dim=1)
                bv = torch.cat([bv[:, 1:], v[:, None]], dim=1)
            self.layers[layer] = (bk, bv)
        self.fresh = {}


class BankedSelfAttention:
    """attn1 with the bank: [B, N, C] tokens, heads split from C."""

    def __init__(self, layer: int, bank: Bank | None):
        self.layer, self.bank = layer, bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        keys, values = k, v
        if self.bank is not None:
            self.bank.fresh[self.layer] = (k, v)
            banked = self.bank.layers.get(self.layer)
            if banked is None:
                bk = torch.zeros(b, self.bank.frames, n, k.shape[-1], dtype=k.dtype)
                bv = torch.zeros_like(bk)
            else:
                bk, bv = banked
            keys = torch.cat([k, bk.flatten(1, 2)], dim=1)
            values = torch.cat([v, bv.flatten(1, 2)], dim=1)
        h = attn.heads
        d = k.shape[-1] // h

        def split(t):
            return t.view(b, -1, h, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(keys), split(values))
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def install(unet, bank: Bank | None) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = {}
    layer = 0
    # attn_processors lists layers in module order: down blocks, up blocks, then mid; number the
    # self-attention layers in call order (down, mid, up) instead.
    names = list(unet.attn_processors.keys())
    order = ([n for n in names if n.startswith("down_blocks")]
             + [n for n in names if n.startswith("mid_block")]
             + [n for n in names if n.startswith("up_blocks")])
    for name in order:
        if name.endswith("attn1.processor"):
            processors[name] = BankedSelfAttention(layer, bank)
            layer += 1
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)


def main() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(_common.FIXTURES / "tiny-sd-turbo" / "unet").eval().double()
    g = torch.Generator().manual_seed(7)
    text = torch.randn(2, 77, 32, generator=g)
    tensors = {"text": text}
    inputs = []
    for c in range(CALLS):
        sample = torch.randn(2, 4, 8, 8, generator=g)
        timesteps = torch.tensor([999.0 - 100 * c, 500.0 - 50 * c])
        tensors[f"sample_{c}"] = sample
        tensors[f"timesteps_{c}"] = timesteps
        inputs.append((sample.double(), timesteps.double()))
    with torch.no_grad():
        text = text.double()
        install(unet, None)
        for c, (sample, t) in enumerate(inputs):
            tensors[f"plain_{c}"] = f32(unet(sample, t, encoder_hidden_states=text).sample)
        for frames, interval in SETTINGS:
            bank = Bank(frames, interval)
            install(unet, bank)
            for c, (sample, t) in enumerate(inputs):
                out = f32(unet(sample, t, encoder_hidden_states=text).sample)
                bank.commit()
                tensors[f"out_f{frames}_i{interval}_{c}"] = out
                moved = (out - tensors[f"plain_{c}"]).abs().max().item()
                print(f"F={frames} I={interval} call {c}: max |banked - plain| = {moved:.4f}")
    path = _common.GOLDEN_DIR / "cached_attention.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    print("wrote", path)


if __name__ == "__main__":
    main()
