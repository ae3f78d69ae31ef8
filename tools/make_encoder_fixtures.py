#!/usr/bin/env python3
"""Parity fixtures for mitune's encoders against transformers (run by hand; CI never needs Python).

    /root/venv/bin/python tools/make_encoder_fixtures.py          # writes tests/fixtures/dinov2*/

Tiny *random* towers built from config objects (never from the hub), f32, saved with `save_pretrained` (so the
directory is exactly what transformers writes and loads):
  - dinov2: `Dinov2Model` (CLS, layer scale, patch bias, qkv bias), image 32 px at 8 px patches (4×4 grid, as the CLIP/SigLIP fixture towers, so they fuse)
  - dinov2_registers: `Dinov2WithRegistersModel` with 2 register tokens
Each directory's expected.safetensors holds `pixel_values` (two real photos, resized/normalised as ImageNet),
every `hidden_states.<i>` and `last_hidden_state` at the trained size, and `hires.*` the same at 2× the size
(interpolated position embeddings).
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
torch.manual_seed(0)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def pixels(size):
    out = []
    for name in ("astronaut_32.png", "coffee_32.png"):
        im = Image.open(FIX / "images" / name).convert("RGB").resize((size, size), Image.BICUBIC)
        a = (np.asarray(im, dtype=np.float64) / 255.0 - MEAN) / STD
        out.append(torch.tensor(a.transpose(2, 0, 1), dtype=torch.float32))
    return torch.stack(out)


def build(name, model):
    model.eval()
    for p in model.parameters():  # layer scale and norms away from their identity init, so a mapping bug shows
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.1)
    out_dir = FIX / name
    model.save_pretrained(out_dir, safe_serialization=True)
    size = model.config.image_size
    tensors = {}
    for tag, s in (("", size), ("hires.", 2 * size)):
        px = pixels(s)
        with torch.no_grad():
            o = model(pixel_values=px, output_hidden_states=True)
        tensors[f"{tag}pixel_values"] = px
        tensors[f"{tag}last_hidden_state"] = o.last_hidden_state.contiguous()
        for i, h in enumerate(o.hidden_states):
            tensors[f"{tag}hidden_states.{i}"] = h.contiguous()
    save_file(tensors, out_dir / "expected.safetensors")
    print(name, sorted(k for k in tensors if not k.startswith("hires.hidden")))


if __name__ == "__main__":
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=32,
                  patch_size=8, layer_norm_eps=1e-6)
    build("dinov2", Dinov2Model(Dinov2Config(**common)))
    build("dinov2_registers", Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **common)))
