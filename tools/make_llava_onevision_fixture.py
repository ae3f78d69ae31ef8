#!/usr/bin/env python3
"""LLaVA-OneVision parity fixture (run by hand; CI never needs Python):

    /root/venv/bin/python tools/make_llava_onevision_fixture.py build      # writes tests/fixtures/llava_onevision/
    cargo test --release --test llava_next                                  # (also saves /tmp/mitune-llava-ov-saved)
    /root/venv/bin/python tools/make_llava_onevision_fixture.py roundtrip /tmp/mitune-llava-ov-saved

A tiny *random* `LlavaOnevisionForConditionalGeneration`: SigLIP at 32 px with 8-px patches (a 4×4 grid per tile, no
CLS, strategy `full`), MLP-2 projector, `image_newline`, Qwen2 (tied embeddings) with the ChatML tokenizer of
tests/fixtures/llava_siglip_qwen2. Its `LlavaOnevisionImageProcessorPil` uses the released 6 × 6 pinpoint grid scaled
to 32-px tiles and `anyres_max_9`, so a large photo's stitched grid is bilinearly downsampled to about 9 tiles'
worth. Cases: single images of several sizes (tiling, unpadding, downsampling), two images in one prompt (each then
one padded-square tile + newline, as the processor does for multi-image samples), a left-padded batch, greedy
generation, a masked loss with gradients.
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
OUT = FIX / "llava_onevision"
PINPOINTS = [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)]
torch.manual_seed(0)


def photos():
    cat = Image.open(IMG / "chelsea_75x50.png").convert("RGB")
    big = cat.resize((128, 128), Image.BICUBIC)  # 4 × 4 tiles: more than anyres_max_9, so downsampled
    big.save(IMG / "big_128.png")
    names = ["chelsea_75x50.png", "astronaut_32.png", "wide_120x30.png", "tall_20x70.png", "tiny_6x4.png",
             "big_128.png"]
    return {n: Image.open(IMG / n).convert("RGB") for n in names}


def processor(improc, tok):
    """transformers 5.23's LlavaOnevisionProcessor insists on a video processor, whose class needs torchvision (not
    installable for torch 2.15 here); images never touch it, so a placeholder stands in and the class check skips it."""
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = \
        lambda self, n, a: None if n == "video_processor" else check(self, n, a)
    return LlavaOnevisionProcessor(image_processor=improc, tokenizer=tok, video_processor=object(),
                                   num_image_tokens=16, vision_feature_select_strategy="full",
                                   chat_template=tok.chat_template, vision_aspect_ratio="anyres_max_9")


def build():
    from transformers import (AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor, Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil
    tok = AutoTokenizer.from_pretrained(FIX / "llava_siglip_qwen2")
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                               projector_hidden_act="gelu", vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                               vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True)
    model = LlavaOnevisionForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
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
    improc = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = processor(improc, tok)
    tok.save_pretrained(OUT)
    cfgp = {"image_processor": improc.to_dict(), "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
            "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9", "image_token": "<image>"}
    (OUT / "processor_config.json").write_text(json.dumps(cfgp, indent=2) + "\n")
    imgs = photos()
    tensors, meta = {}, {}

    def case(name, prompts, names, per_row, padding_side="right"):
        tok.padding_side = padding_side
        ims = None
        if names:  # nested per prompt, as the processor counts images per sample
            ims, k = [], 0
            for n in per_row:
                ims.append([imgs[x] for x in names[k:k + n]])
                k += n
        enc = proc(text=prompts, images=ims, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**enc)
        cols = [j for j in range(enc["input_ids"].shape[1]) if not (enc["input_ids"][:, j] == image_id).any()][-16:]
        tensors[f"{name}.logits"] = out.logits[:, cols].float().contiguous()
        meta[name] = {"prompts": prompts, "images": names, "images_per_row": per_row, "padding_side": padding_side,
                      "logit_columns": cols, "input_ids": enc["input_ids"].tolist(),
                      "attention_mask": enc["attention_mask"].tolist()}
        if ims:
            meta[name]["image_sizes"] = enc["image_sizes"].tolist()
            if len(names) > 1 and len(per_row) == 1:  # multi-image tiles are not under `preprocess`
                tensors[f"{name}.pixel_values"] = enc["pixel_values"][:, 0].contiguous()
        return enc

    p1 = "<|im_start|>user\n<image>\nWhat is shown in this picture?<|im_end|>\n<|im_start|>assistant\n"
    case("image_text", [p1], ["chelsea_75x50.png"], [1])
    case("big", [p1], ["big_128.png"], [1])
    case("two_images", ["<|im_start|>user\n<image><image>\nCompare them.<|im_end|>\n<|im_start|>assistant\n"],
         ["wide_120x30.png", "tall_20x70.png"], [2])
    case("batch", [p1, "<|im_start|>user\n<image> Hi!<|im_end|>\n<|im_start|>assistant\n"],
         ["tiny_6x4.png", "astronaut_32.png"], [1, 1], padding_side="left")
    tok.padding_side = "right"

    enc = proc(text=[p1], images=[[imgs["astronaut_32.png"]]], return_tensors="pt")
    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
    meta["greedy"] = {"prompt": p1, "images": ["astronaut_32.png"], "max_new_tokens": 8, "output_ids": new,
                      "input_ids": enc["input_ids"][0].tolist(),
                      "logprobs": [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, new)]}

    b = proc(text=[p1 + "A big cat.<|im_end|>"], images=[[imgs["big_128.png"]]], return_tensors="pt")
    n_prompt = len(proc(text=[p1], images=[[imgs["big_128.png"]]])["input_ids"][0])
    labels = b["input_ids"].clone()
    labels[0, :n_prompt] = -100
    model.zero_grad()
    out = model(**b, labels=labels)
    out.loss.backward()
    tensors["loss.grad_linear_1_weight"] = model.model.multi_modal_projector.linear_1.weight.grad.contiguous()
    tensors["loss.grad_image_newline"] = model.model.image_newline.grad.contiguous()
    meta["loss"] = {"input_ids": b["input_ids"][0].tolist(), "labels": labels[0].tolist(), "loss": out.loss.item(),
                    "images": ["big_128.png"], "image_sizes": b["image_sizes"].tolist()}
    model.zero_grad()

    meta["preprocess"] = {}
    for n, im in imgs.items():
        pv = improc(images=[[im]], return_tensors="pt")
        ids = proc(text="<image>", images=[[im]])["input_ids"][0]
        meta["preprocess"][n] = {"tiles": pv["pixel_values"].shape[1], "size": list(im.size[::-1]),
                                 "tokens": sum(1 for t in ids if t == image_id)}
        if n not in ("wide_120x30.png", "tall_20x70.png"):  # those two: counts only (their tiles are LLaVA-NeXT's)
            tensors[f"preprocess.{n}"] = pv["pixel_values"][0].contiguous()
    save_file(tensors, OUT / "expected.safetensors")
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print({n: v for n, v in meta["preprocess"].items()})
    print("two_images tokens", sum(1 for t in meta["two_images"]["input_ids"][0] if t == image_id))
    print("greedy", new)


def roundtrip(saved):
    from transformers import LlavaOnevisionForConditionalGeneration
    from safetensors.torch import load_file
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(saved).float().eval()
    from transformers import AutoTokenizer
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil
    cfgp = json.loads((OUT / "processor_config.json").read_text())["image_processor"]
    cfgp.pop("image_processor_type", None)
    proc = processor(LlavaOnevisionImageProcessorPil(**cfgp), AutoTokenizer.from_pretrained(OUT))
    meta = json.loads((OUT / "expected.json").read_text())
    exp = load_file(OUT / "expected.safetensors")
    c = meta["big"]
    enc = proc(text=c["prompts"], images=[[Image.open(IMG / n).convert("RGB") for n in c["images"]]],
               return_tensors="pt")
    with torch.no_grad():
        lg = model(**enc).logits[:, c["logit_columns"]]
    d = (lg - exp["big.logits"]).abs().max().item()
    res = {"saved": str(saved), "class": type(model).__name__, "max_abs_logit_diff": d}
    (OUT / "roundtrip_check.json").write_text(json.dumps(res, indent=1) + "\n")
    print(res)
    assert d < 1e-4, d


if __name__ == "__main__":
    if sys.argv[1:2] == ["roundtrip"]:
        roundtrip(sys.argv[2])
    else:
        build()
