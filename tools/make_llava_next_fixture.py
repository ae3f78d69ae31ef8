#!/usr/bin/env python3
"""LLaVA-NeXT (AnyRes) parity fixture (run by hand; CI never needs Python):

    /root/venv/bin/python tools/make_llava_next_fixture.py build        # writes tests/fixtures/llava_next/
    cargo test --release --test llava_next                               # (also exports to target/llava_next_export)
    /root/venv/bin/python tools/make_llava_next_fixture.py roundtrip target/llava_next_export

A tiny *random* `LlavaNextForConditionalGeneration` (CLIP ViT at 32 px with 8-px patches, so one tile is a 4×4
feature grid; MLP-2 projector; `image_newline`; LLaMA) built from config objects, saved with a `LlavaNextProcessor`
whose `LlavaNextImageProcessorPil` uses the real checkpoints' pinpoints scaled to 32-px tiles. The tokenizer is the
one of tests/fixtures/llava_clip_llama (byte-level BPE with `<image>`). Photos of several aspect ratios: 3:2, a wide
4:1, a tall 2:7, a square, and a 6×4 image smaller than one patch. expected.json / expected.safetensors hold, per
case: the processor's `input_ids` (placeholders expanded by each image's own count), `image_sizes`,
`pixel_values`, logits, greedy generation (ids and log-probs), and a masked loss with two gradients.
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
IMG = FIX / "images"
OUT = FIX / "llava_next"
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
torch.manual_seed(0)


def photos():
    """Derived from the committed scikit-image photos, so the set stays reproducible offline."""
    cat = Image.open(IMG / "chelsea_75x50.png").convert("RGB")
    astro = Image.open(IMG / "astronaut_32.png").convert("RGB")
    coffee = Image.open(IMG / "coffee_32.png").convert("RGB")
    made = {
        "wide_120x30.png": cat.resize((120, 30), Image.BICUBIC),  # 4:1
        "tall_20x70.png": coffee.resize((20, 70), Image.BICUBIC),  # 2:7
        "tiny_6x4.png": astro.resize((6, 4), Image.BICUBIC),  # smaller than one 8-px patch
    }
    for n, im in made.items():
        im.save(IMG / n)
    names = ["chelsea_75x50.png", "astronaut_32.png", *made]
    return {n: Image.open(IMG / n).convert("RGB") for n in names}


def build():
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    tok = AutoTokenizer.from_pretrained(FIX / "llava_clip_llama")
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                          projector_hidden_act="gelu", vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
                          image_seq_length=16)
    model = LlavaNextForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():  # the image path's weights large enough that images move the logits, norms off 1/0
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "language_model" not in n:
                p.normal_(0, 0.2)
        model.model.image_newline.normal_(0, 1.0)
    OUT.mkdir(parents=True, exist_ok=True)
    # stored bf16 (half the bytes); expected values are computed from exactly those weights, upcast to f32
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # rotary inv_freq must not round-trip through bf16
    model.to(torch.bfloat16).save_pretrained(OUT, safe_serialization=True)
    model.to(torch.float32)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    improc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", chat_template=tok.chat_template,
                              num_additional_image_tokens=1)
    proc.save_pretrained(OUT)
    imgs = photos()
    tensors, meta = {}, {}

    def case(name, prompts, names, padding_side="right"):
        tok.padding_side = padding_side
        ims = [imgs[n] for n in names] or None
        enc = proc(text=prompts, images=ims, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**enc)
        # logits at the last 16 columns no row holds a placeholder in (text after the images depends on them;
        # keeps the fixture small); pixel values are checked per photo under `preprocess`
        cols = [j for j in range(enc["input_ids"].shape[1]) if not (enc["input_ids"][:, j] == image_id).any()][-16:]
        tensors[f"{name}.logits"] = out.logits[:, cols].float().contiguous()
        meta[name] = {"prompts": prompts, "images": names, "padding_side": padding_side, "logit_columns": cols,
                      "input_ids": enc["input_ids"].tolist(), "attention_mask": enc["attention_mask"].tolist()}
        if ims:
            meta[name]["image_sizes"] = enc["image_sizes"].tolist()
        return enc

    p1 = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"
    case("image_text", [p1], ["chelsea_75x50.png"])
    case("two_images", ["USER: <image> and <image>\nCompare the two pictures. ASSISTANT:"],
         ["wide_120x30.png", "tall_20x70.png"])
    case("text_only", ["The cat sits on the mat and looks at the coffee."], [])
    case("batch", ["USER: <image>\nDescribe the photo in detail. ASSISTANT:", "USER: <image> Hi! ASSISTANT:"],
         ["tiny_6x4.png", "astronaut_32.png"], padding_side="left")
    tok.padding_side = "right"

    # greedy generation with log-probs of the generated ids, on the square photo: its tiles need no resampling, so
    # `mitune generate` preprocessing it itself must give these ids and log-probs too
    enc = proc(text=[p1], images=[imgs["astronaut_32.png"]], return_tensors="pt")
    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
    meta["greedy"] = {"prompt": p1, "images": ["astronaut_32.png"], "max_new_tokens": 8, "output_ids": new,
                      "input_ids": enc["input_ids"][0].tolist(),
                      "logprobs": [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, new)]}

    # masked next-token loss (prompt masked with -100) and the gradients of the projector and image_newline
    b = proc(text=p1 + " A cat on a rug.", images=[imgs["wide_120x30.png"]], return_tensors="pt")
    n_prompt = len(proc(text=p1, images=[imgs["wide_120x30.png"]])["input_ids"][0])
    labels = b["input_ids"].clone()
    labels[0, :n_prompt] = -100
    model.zero_grad()
    out = model(**b, labels=labels)
    out.loss.backward()
    tensors["loss.grad_linear_1_weight"] = model.model.multi_modal_projector.linear_1.weight.grad.contiguous()
    tensors["loss.grad_image_newline"] = model.model.image_newline.grad.contiguous()
    meta["loss"] = {"input_ids": b["input_ids"][0].tolist(), "labels": labels[0].tolist(), "loss": out.loss.item(),
                    "images": ["wide_120x30.png"], "image_sizes": b["image_sizes"].tolist()}
    model.zero_grad()

    # preprocessing of every photo alone (pixel values, tile count) and its placeholder count
    meta["preprocess"] = {}
    for n, im in imgs.items():
        pv = improc(images=[im], return_tensors="pt")
        tensors[f"preprocess.{n}"] = pv["pixel_values"][0].contiguous()
        ids = proc(text="<image>", images=[im])["input_ids"][0]
        meta["preprocess"][n] = {"tiles": pv["pixel_values"].shape[1], "size": list(im.size[::-1]),
                                 "tokens": sum(1 for t in ids if t == image_id)}
    save_file(tensors, OUT / "expected.safetensors")
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print({n: v for n, v in meta["preprocess"].items()})
    print("greedy", new)


def roundtrip(saved):
    """A directory mitune saved must load in transformers with the fixture's logits."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    model = LlavaNextForConditionalGeneration.from_pretrained(saved).float().eval()
    proc = LlavaNextProcessor.from_pretrained(OUT)
    meta = json.loads((OUT / "expected.json").read_text())
    from safetensors.torch import load_file
    exp = load_file(OUT / "expected.safetensors")
    c = meta["image_text"]
    enc = proc(text=c["prompts"], images=[Image.open(IMG / n).convert("RGB") for n in c["images"]],
               return_tensors="pt")
    with torch.no_grad():
        lg = model(**enc).logits[:, c["logit_columns"]]
    d = (lg - exp["image_text.logits"]).abs().max().item()
    res = {"saved": str(saved), "class": type(model).__name__, "max_abs_logit_diff": d}
    (OUT / "roundtrip_check.json").write_text(json.dumps(res, indent=1) + "\n")
    print(res)
    assert d < 1e-4, d


if __name__ == "__main__":
    if sys.argv[1:2] == ["roundtrip"]:
        roundtrip(sys.argv[2])
    else:
        build()
