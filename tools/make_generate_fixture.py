"""Batched greedy generation with transformers on the parity fixtures, for tests/generate.rs.

Run by hand (CI never needs Python):  /path/to/venv/bin/python tools/make_generate_fixture.py
Writes tests/fixtures/<model>/generate_batch.json: three prompts of different lengths (image + text, text only,
short text), left-padded into one batch, `generate(do_sample=False, max_new_tokens=8)`; per row the unpadded
prompt ids and the new ids up to and including the first EOS (transformers pads finished rows afterwards).
"""
import json
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPTS = [
    ("USER: <image>\nWhat is shown in this picture? ASSISTANT:", ["astronaut_32.png"]),
    ("The cat sits on the mat and looks at the coffee.", []),
    ("USER: Hello there! ASSISTANT:", []),
    ("USER: <image>\nDescribe the photo in detail. ASSISTANT:", ["coffee_32.png"]),
]

for name in ["llava_clip_llama", "llava_siglip_qwen2"]:
    d = FIX / name
    model = LlavaForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(d)
    proc.tokenizer.padding_side = "left"
    texts = [p for p, _ in PROMPTS]
    images = [Image.open(FIX / "images" / f).convert("RGB") for _, fs in PROMPTS for f in fs]
    b = proc(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        g = model.generate(**b, max_new_tokens=8, do_sample=False,
                           pad_token_id=proc.tokenizer.pad_token_id)
    t = b["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for i, (p, fs) in enumerate(PROMPTS):
        ids = [x for x, m in zip(b["input_ids"][i].tolist(), b["attention_mask"][i].tolist()) if m]
        new = []
        for x in g[i, t:].tolist():
            new.append(x)
            if x in eos:
                break
        rows.append({"prompt": p, "images": fs, "input_ids": ids, "output_ids": new})
    out = {"transformers": transformers.__version__, "max_new_tokens": 8, "rows": rows}
    (d / "generate_batch.json").write_text(json.dumps(out, indent=1))
    print(name, [r["output_ids"] for r in rows])
