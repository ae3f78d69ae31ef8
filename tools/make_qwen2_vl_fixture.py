#!/usr/bin/env python3
"""Qwen2-VL and Qwen2.5-VL parity fixtures (run by hand; CI never needs Python):

    /root/venv/bin/python tools/make_qwen2_vl_fixture.py build [--v25]   # tests/fixtures/qwen2_vl/ (qwen2_5_vl/)
    cargo test --release --test qwen2_vl              # (also saves /tmp/mitune-qwen2-vl-saved, ...-qwen2-5-vl-saved)
    /root/venv/bin/python tools/make_qwen2_vl_fixture.py roundtrip /tmp/mitune-qwen2-vl-saved [EXPORTED] [--v25]
    /root/venv/bin/python tools/make_qwen2_vl_fixture.py video [--v25]   # video.json / video.safetensors beside

A tiny *random* `Qwen2VLForConditionalGeneration` (ViT with 8-px patches, temporal patch 2, 2-D rotary, 2×2 patch
merger; Qwen2 LLM with M-RoPE sections [2, 3, 3]) with bf16 weights, and a `Qwen2VLProcessor` whose
`Qwen2VLImageProcessorPil` resizes between 256 and 4096 pixels (factor 16). The tokenizer is the ChatML one of
tests/fixtures/llava_siglip_qwen2 with Qwen2-VL's vision tokens added, and Qwen2-VL's chat template. With `--v25`: `Qwen2_5_VLForConditionalGeneration` — an RMSNorm + SwiGLU ViT whose blocks
attend within 32-px windows (2 × 2 merged tokens) except the full-attention block 1, and an RMSNorm merger — whose
pixel values are Qwen2-VL's (same processor and photos), so only that fixture stores them. Cases: one
image, two images of different sizes, text only, a left-padded batch; M-RoPE position ids from `get_rope_index`;
greedy generation; a masked loss with the merger's gradient.

`video` (needs torchvision, for `Qwen2VLVideoProcessor`) adds clip cases to a built fixture without touching the
rest: a 6-frame clip panning across a photo (tests/fixtures/video/pan/, made here from chelsea_75x50.png), sized by
the video processor's own budget (256..2048 pixels, written as video_preprocessor_config.json); cases: the clip
alone at 2 fps, an image then the clip, and (Qwen2.5-VL, whose temporal positions follow `second_per_grid_ts`)
the clip at 1.5 fps; `get_rope_index` positions, logits (last 4 text columns), greedy ids, the masked loss with
gradients, and `sample_frames` indices for several clip lengths and rates. Video pixel values are stored as bf16
and the model reads exactly those.
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
V25 = "--v25" in sys.argv
OUT = FIX / ("qwen2_5_vl" if V25 else "qwen2_vl")
torch.manual_seed(0)

TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def processor(improc, tok):
    """Qwen2VLProcessor insists on a video processor, whose class needs torchvision (not installable for torch 2.15
    here); images never touch it, so a placeholder stands in and the class check skips it."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    if V25:
        Qwen2VLProcessor = Qwen2_5_VLProcessor  # noqa: N806
    from transformers.processing_utils import ProcessorMixin
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = \
        lambda self, n, a: None if n == "video_processor" else check(self, n, a)
    return Qwen2VLProcessor(image_processor=improc, tokenizer=tok, video_processor=object(), chat_template=TEMPLATE)


def video_processor():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    return Qwen2VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, fps=2.0, min_frames=4,
                                 max_frames=768, cap_pixels_per_frame=False,
                                 size={"shortest_edge": 256, "longest_edge": 2048})


def first_frame(pv):
    """[patches, 3·2·p·p] -> [patches, 3, p, p]: a still image's two temporal frames are equal, so one is stored
    (half the bytes; tests repeat it)."""
    n, d = pv.shape
    p = int((d // 6) ** 0.5)
    return pv.reshape(n, 3, 2, p, p)[:, :, 0].contiguous()


def build():
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if V25:
        from transformers import Qwen2_5_VLConfig as Qwen2VLConfig  # noqa: N814
        from transformers import Qwen2_5_VLForConditionalGeneration as Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tok = AutoTokenizer.from_pretrained(FIX / "llava_siglip_qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    tok.chat_template = TEMPLATE
    # the base tokenizer names `<image>` its image token; Qwen2-VL's is `<|image_pad|>`
    tok.image_token = "<|image_pad|>"
    tok.video_token = "<|video_pad|>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                     "<|video_pad|>"]}
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           hidden_act="silu", window_size=32, fullatt_block_indexes=[1], tokens_per_second=2)
        if V25 else
        dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=8,
             spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=len(tok), bos_token_id=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [2, 3, 3]}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    model = Qwen2VLForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "visual" in n:
                p.normal_(0, 0.2)
    OUT.mkdir(parents=True, exist_ok=True)
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # rotary inv_freq must not round-trip through bf16
    model.to(torch.bfloat16).save_pretrained(OUT, safe_serialization=True)
    model.to(torch.float32)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    improc = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 256, "longest_edge": 4096})
    proc = processor(improc, tok)
    tok.save_pretrained(OUT)
    (OUT / "chat_template.jinja").write_text(TEMPLATE)
    (OUT / "preprocessor_config.json").write_text(json.dumps(improc.to_dict(), indent=2) + "\n")
    names = ["chelsea_75x50.png", "astronaut_32.png", "wide_120x30.png", "tall_20x70.png", "tiny_6x4.png",
             "big_128.png"]
    imgs = {n: Image.open(IMG / n).convert("RGB") for n in names}
    tensors, meta = {}, {"token_ids": ids}

    def case(name, prompts, names, padding_side="right"):
        tok.padding_side = padding_side
        ims = [imgs[n] for n in names] or None
        enc = proc(text=prompts, images=ims, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**{k: v for k, v in enc.items()})
        image_id = ids["<|image_pad|>"]
        cols = [j for j in range(enc["input_ids"].shape[1]) if not (enc["input_ids"][:, j] == image_id).any()][-8:]
        tensors[f"{name}.logits"] = out.logits[:, cols].float().contiguous()
        meta[name] = {"prompts": prompts, "images": names, "padding_side": padding_side, "logit_columns": cols,
                      "input_ids": enc["input_ids"].tolist(), "attention_mask": enc["attention_mask"].tolist()}
        if ims:
            meta[name]["image_grid_thw"] = enc["image_grid_thw"].tolist()
            if V25:  # the same processor and photos as tests/fixtures/qwen2_vl: its pixel values serve both
                from safetensors.torch import load_file
                same = load_file(FIX / "qwen2_vl" / "expected.safetensors")[f"{name}.pixel_values"]
                assert torch.equal(first_frame(enc["pixel_values"]), same), name
            else:
                tensors[f"{name}.pixel_values"] = first_frame(enc["pixel_values"])
            pos, delta = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                                    image_grid_thw=enc["image_grid_thw"],
                                                    attention_mask=enc["attention_mask"])
            meta[name]["position_ids"] = pos.tolist()
            meta[name]["rope_deltas"] = delta.flatten().tolist()
        return enc

    def chat(user, n):
        content = [{"type": "image"}] * n + [{"type": "text", "text": user}]
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)
    p1 = chat("What is shown in this picture?", 1)
    enc = case("image_text", [p1], ["chelsea_75x50.png"])
    case("two_images", [chat("Compare them.", 2)], ["wide_120x30.png", "tall_20x70.png"])
    case("text_only", [chat("The cat sits on the mat.", 0)], [])
    case("batch", [chat("Describe the photo in detail.", 1), chat("Hi!", 1)], ["tiny_6x4.png", "big_128.png"],
         padding_side="left")
    tok.padding_side = "right"
    # LLaVA's marker in a user string: the typed template renders it as the image part it stands for
    meta["chat"] = {"user": "<image>What is shown in this picture?", "rendered": p1}

    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
    meta["greedy"] = {"prompt": p1, "images": ["chelsea_75x50.png"], "max_new_tokens": 8, "output_ids": new,
                      "input_ids": enc["input_ids"][0].tolist(),
                      "logprobs": [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, new)]}

    b = proc(text=[p1 + "A cat.<|im_end|>"], images=[imgs["big_128.png"]], return_tensors="pt")
    n_prompt = len(proc(text=[p1], images=[imgs["big_128.png"]])["input_ids"][0])
    labels = b["input_ids"].clone()
    labels[0, :n_prompt] = -100
    model.zero_grad()
    out = model(**b, labels=labels)
    out.loss.backward()
    tensors["loss.grad_merger_mlp0_weight"] = model.model.visual.merger.mlp[0].weight.grad[:32].contiguous()
    tensors["loss.grad_patch_embed"] = model.model.visual.patch_embed.proj.weight.grad.reshape(32, -1).contiguous()
    if V25:
        tensors["loss.grad_block0_gate"] = model.model.visual.blocks[0].mlp.gate_proj.weight.grad.contiguous()
    meta["loss"] = {"input_ids": b["input_ids"][0].tolist(), "labels": labels[0].tolist(), "loss": out.loss.item(),
                    "images": ["big_128.png"], "image_grid_thw": b["image_grid_thw"].tolist()}
    model.zero_grad()

    meta["preprocess"] = {}
    for n, im in imgs.items():
        pv = improc(images=[im], return_tensors="pt")
        meta["preprocess"][n] = {"size": list(im.size[::-1]), "grid_thw": pv["image_grid_thw"][0].tolist()}
        assert V25 or (n != "big_128.png") or torch.equal(first_frame(pv["pixel_values"]),  # the loss case's
                                                          tensors["batch.pixel_values"][8:])  # = the batch's 2nd
    save_file(tensors, OUT / "expected.safetensors")
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(meta["preprocess"])
    print("greedy", new, "deltas", meta["batch"]["rope_deltas"])


CLIP = FIX / "video" / "pan"


def make_clip():
    """Six 56×40 crops of the photo, each 3 px further right: a short pan."""
    src = Image.open(IMG / "chelsea_75x50.png").convert("RGB")
    CLIP.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        src.crop((3 * i, 5, 3 * i + 56, 45)).save(CLIP / f"frame_{i + 1}.png", optimize=True)


def video():
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.video_utils import VideoMetadata
    from safetensors.torch import load_file
    if not V25:
        make_clip()
    model = AutoModelForImageTextToText.from_pretrained(OUT).float().eval()
    tok = AutoTokenizer.from_pretrained(OUT)
    cfgp = json.loads((OUT / "preprocessor_config.json").read_text())
    cfgp.pop("image_processor_type", None)
    improc = Qwen2VLImageProcessorPil(**cfgp)
    vp = video_processor()
    (OUT / "video_preprocessor_config.json").write_text(vp.to_json_string())
    cls = Qwen2_5_VLProcessor if V25 else Qwen2VLProcessor
    proc = cls(image_processor=improc, tokenizer=tok, video_processor=vp, chat_template=TEMPLATE)
    frames = [Image.open(CLIP / f"frame_{i + 1}.png").convert("RGB") for i in range(6)]
    photo = Image.open(IMG / "chelsea_75x50.png").convert("RGB")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|image_pad|>", "<|video_pad|>"]}
    tensors, meta = {}, {"clip": [f"frame_{i + 1}.png" for i in range(6)]}

    def chat(parts, user):
        content = [{"type": p} for p in parts] + [{"type": "text", "text": user}]
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=False)

    def encode(prompt, images, fps):
        md = [VideoMetadata(total_num_frames=len(frames), fps=fps)]
        enc = proc(text=[prompt], images=images, videos=[frames], video_metadata=md, do_sample_frames=False,
                   return_tensors="pt")
        # stored as bf16 (the fixture budget): the model reads exactly the stored values
        enc["pixel_values_videos"] = enc["pixel_values_videos"].to(torch.bfloat16).float()
        return enc

    def case(name, parts, user, images, fps):
        prompt = chat(parts, user)
        enc = encode(prompt, images, fps)
        with torch.no_grad():
            out = model(**enc)
        ii = enc["input_ids"]
        cols = [j for j in range(ii.shape[1]) if ii[0, j] not in ids.values()][-4:]
        tensors[f"{name}.logits"] = out.logits[:, cols].float().contiguous()
        kw = {"second_per_grid_ts": enc["second_per_grid_ts"]} if V25 else {}
        pos, delta = model.model.get_rope_index(ii, enc["mm_token_type_ids"], image_grid_thw=enc.get("image_grid_thw"),
                                                video_grid_thw=enc["video_grid_thw"],
                                                attention_mask=enc["attention_mask"], **kw)
        meta[name] = {"prompt": prompt, "user": user, "fps": fps, "images": ["chelsea_75x50.png"] if images else [],
                      "input_ids": ii[0].tolist(), "logit_columns": cols,
                      "video_grid_thw": enc["video_grid_thw"].tolist(), "position_ids": pos[:, 0].tolist(),
                      "rope_deltas": delta.flatten().tolist()}
        if V25:
            meta[name]["second_per_grid_ts"] = [float(x) for x in enc["second_per_grid_ts"]]
        pv = enc["pixel_values_videos"].to(torch.bfloat16).contiguous()
        if V25:  # the same processor and frames as tests/fixtures/qwen2_vl: its pixel values serve both
            assert torch.equal(pv, load_file(FIX / "qwen2_vl" / "video.safetensors")["pixel_values_videos"])
        else:
            tensors.setdefault("pixel_values_videos", pv)
            assert torch.equal(pv, tensors["pixel_values_videos"]), name
        return enc

    enc = case("video", ["video"], "What happens in this clip?", None, 2.0)
    case("image_video", ["image", "video"], "Does the clip show the photo?", [photo], 2.0)
    if V25:  # Qwen2-VL's temporal positions do not depend on the rate: the case would repeat "video"
        case("video_slow", ["video"], "What happens in this clip?", None, 1.5)
    meta["chat"] = {"user": "<video>What happens in this clip?", "rendered": meta["video"]["prompt"]}

    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
    meta["greedy"] = {"output_ids": new,
                      "logprobs": [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, new)]}

    p = meta["video"]["prompt"]
    b = encode(p + "A cat looks on.<|im_end|>", None, 2.0)
    labels = b["input_ids"].clone()
    labels[0, :len(enc["input_ids"][0])] = -100
    model.zero_grad()
    out = model(**b, labels=labels)
    out.loss.backward()
    tensors["loss.grad_merger_mlp0_weight"] = model.model.visual.merger.mlp[0].weight.grad[:32].contiguous()
    tensors["loss.grad_patch_embed"] = model.model.visual.patch_embed.proj.weight.grad.reshape(32, -1)[:8].contiguous()
    meta["loss"] = {"input_ids": b["input_ids"][0].tolist(), "labels": labels[0].tolist(), "loss": out.loss.item()}

    # frame sampling (`sample_frames` with a rate): clip length, recorded rate, sampling rate, max_frames
    meta["sampling"] = []
    for total, rate, fps, max_frames in [(6, 2.0, 2.0, 768), (30, 30.0, 2.0, 768), (9, 6.0, 2.0, 768),
                                         (100, 10.0, 2.0, 8), (3, 2.0, 2.0, 768), (7, 3.0, 2.0, 768),
                                         (50, 24.0, 1.0, 768), (13, 1.0, 2.0, 6)]:
        idx = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=rate), fps=fps, max_frames=max_frames)
        meta["sampling"].append({"total": total, "frame_rate": rate, "fps": fps, "max_frames": max_frames,
                                 "indices": [int(i) for i in idx]})
    save_file(tensors, OUT / "video.safetensors")
    (OUT / "video.json").write_text(json.dumps(meta, indent=1) + "\n")
    print({k: meta[k]["video_grid_thw"] for k in ["video", "image_video", "video_slow"] if k in meta}, "greedy", new,
          "loss", meta["loss"]["loss"], [m["indices"] for m in meta["sampling"]])


def roundtrip(saved, exported=None):
    """`saved`: a mitune-saved model directory: transformers loads it and gives the fixture's logits (image and clip
    cases). `exported` (optional): a directory a mitune training stage wrote; its video_preprocessor_config.json (made
    from the model's clip settings) loads as a `Qwen2VLVideoProcessor` that patches the clip as the fixture's."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from safetensors.torch import load_file
    Qwen2VLForConditionalGeneration = AutoModelForImageTextToText  # noqa: N806
    model = Qwen2VLForConditionalGeneration.from_pretrained(saved).float().eval()
    cfgp = json.loads((OUT / "preprocessor_config.json").read_text())
    cfgp.pop("image_processor_type", None)
    proc = processor(Qwen2VLImageProcessorPil(**cfgp), AutoTokenizer.from_pretrained(OUT))
    meta = json.loads((OUT / "expected.json").read_text())
    exp = load_file(OUT / "expected.safetensors")
    c = meta["two_images"]
    enc = proc(text=c["prompts"], images=[Image.open(IMG / n).convert("RGB") for n in c["images"]],
               return_tensors="pt")
    with torch.no_grad():
        lg = model(**enc).logits[:, c["logit_columns"]]
    d = (lg - exp["two_images.logits"]).abs().max().item()
    res = {"saved": str(saved), "class": type(model).__name__, "max_abs_logit_diff": d}
    # the clip case: the fixture's token ids and (bf16) clip patches through the reloaded model
    vm = json.loads((OUT / "video.json").read_text())
    ve = load_file(OUT / "video.safetensors")
    pv = load_file(FIX / "qwen2_vl" / "video.safetensors")["pixel_values_videos"].float()
    c = vm["video"]
    kw = {"second_per_grid_ts": torch.tensor(c["second_per_grid_ts"])} if V25 else {}
    ii = torch.tensor([c["input_ids"]])
    types = (ii == model.config.video_token_id).int() * 2
    with torch.no_grad():
        lg = model(input_ids=ii, mm_token_type_ids=types, pixel_values_videos=pv,
                   video_grid_thw=torch.tensor(c["video_grid_thw"]), **kw).logits[:, c["logit_columns"]]
    res["video_max_abs_logit_diff"] = (lg - ve["video.logits"]).abs().max().item()
    if exported:
        vp = Qwen2VLVideoProcessor.from_pretrained(exported)
        frames = [Image.open(FIX / "video" / "pan" / f).convert("RGB") for f in vm["clip"]]
        out = vp(videos=[frames], do_sample_frames=False, return_tensors="pt")
        res["exported"] = str(exported)
        res["exported_video_processor"] = {k: getattr(vp, k) for k in ["fps", "min_frames", "max_frames"]}
        res["exported_video_processor"]["size"] = dict(vp.size)
        res["exported_clip_pixel_diff"] = (out["pixel_values_videos"].to(torch.bfloat16).float() - pv).abs().max().item()
        assert res["exported_clip_pixel_diff"] == 0.0, res
    (OUT / "roundtrip_check.json").write_text(json.dumps(res, indent=1) + "\n")
    print(res)
    assert d < 1e-4 and res["video_max_abs_logit_diff"] < 1e-4, res


if __name__ == "__main__":
    if sys.argv[1:2] == ["roundtrip"]:
        roundtrip(sys.argv[2], next((a for a in sys.argv[3:] if not a.startswith("--")), None))
    elif sys.argv[1:2] == ["video"]:
        video()
    else:
        build()
