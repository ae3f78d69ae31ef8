#!/usr/bin/env python3
"""Loads the DINOv2 tower that mitune exported (tests/encoders.rs writes it to $TMPDIR/mitune-dinov2-export) in
transformers and compares its outputs with the fixture's expected ones; writes tests/fixtures/dinov2_export_check.json.

    cargo test --release --test encoders && /root/venv/bin/python tools/check_encoder_export.py
"""
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel

ROOT = Path(__file__).resolve().parent.parent
exported = Path(tempfile.gettempdir()) / "mitune-dinov2-export"
model = AutoModel.from_pretrained(exported).eval()
e = load_file(ROOT / "tests" / "fixtures" / "dinov2" / "expected.safetensors")
with torch.no_grad():
    out = model(pixel_values=e["pixel_values"], output_hidden_states=True)
err = {
    "last_hidden_state": (out.last_hidden_state - e["last_hidden_state"]).abs().max().item(),
    **{f"hidden_states.{i}": (h - e[f"hidden_states.{i}"]).abs().max().item() for i, h in enumerate(out.hidden_states)},
}
result = {"class": type(model).__name__, "max_abs_err": err, "ok": max(err.values()) <= 1e-5}
print(json.dumps(result, indent=2))
(ROOT / "tests" / "fixtures" / "dinov2_export_check.json").write_text(json.dumps(result, indent=2) + "\n")
