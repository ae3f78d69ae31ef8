#!/usr/bin/env python3
"""Loads the InstructBLIP directory mitune saved (tests/instructblip.rs writes $TMPDIR/mitune-instructblip-saved) with
transformers' InstructBlipForConditionalGeneration and InstructBlipProcessor, and compares its logits on the fixture's
image + prompt with the fixture's; writes tests/fixtures/instructblip/roundtrip_check.json.

    cargo test --release --test instructblip && /root/venv/bin/python tools/check_instructblip_roundtrip.py
"""
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "instructblip"
saved = Path(tempfile.gettempdir()) / "mitune-instructblip-saved"
model = InstructBlipForConditionalGeneration.from_pretrained(saved).eval()
proc = InstructBlipProcessor.from_pretrained(saved)
if isinstance(proc.image_token, str):  # the same transformers 5.23 quirk as in make_instructblip_fixture.py
    from tokenizers import AddedToken
    proc.image_token = AddedToken(proc.image_token, normalized=False, special=True)
meta = json.loads((FIX / "expected.json").read_text())["image_text"]
img = Image.open(ROOT / "tests" / "fixtures" / "images" / "astronaut_32.png").convert("RGB")
enc = proc(images=[img], text=meta["prompts"], return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
want = load_file(FIX / "expected.safetensors")["image_text.logits"]
err = (logits - want).abs().max().item()
result = {"class": type(model).__name__, "input_ids_equal": enc["input_ids"].tolist() == meta["input_ids"],
          "qformer_ids_equal": enc["qformer_input_ids"].tolist() == meta["qformer_input_ids"],
          "max_abs_logit_err": err, "ok": err <= 1e-5}
print(json.dumps(result, indent=2))
(FIX / "roundtrip_check.json").write_text(json.dumps(result, indent=2) + "\n")
