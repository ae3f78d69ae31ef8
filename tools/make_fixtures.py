#!/usr/bin/env python3
"""Builds mitune's parity fixtures with HuggingFace transformers (run by hand; CI never needs Python).

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors tokenizers pillow numpy scikit-image
    /tmp/venv/bin/python tools/make_fixtures.py build            # writes tests/fixtures/
    cargo run --release -- export-roundtrip tests/fixtures/llava_clip_llama /tmp/mitune_saved   # (see tests/roundtrip.rs)
    /tmp/venv/bin/python tools/make_fixtures.py roundtrip /tmp/mitune_saved tests/fixtures/llava_clip_llama

`build` makes tiny *random* LLaVA models from config objects (never from the hub):
  - llava_clip_llama:  CLIP ViT (quick_gelu, CLS, feature layer -2, strategy default) + LLaMA (GQA, llama3 rope
    scaling), MLP-2 connector, f32, one safetensors file, Vicuna-style chat template, BOS added by the tokenizer.
  - llava_siglip_qwen2: SigLIP ViT (gelu tanh, no CLS, feature layers [-2, -1] concatenated, strategy full) + Qwen2
    (q/k/v bias, tied embeddings), saved bf16 and sharded, ChatML template, no BOS.
Both use a real byte-level BPE tokenizer trained here on real English text, and real photos from scikit-image.
Expected outputs go to <fixture>/expected.safetensors (tensors) and <fixture>/expected.json (ids, prompts, numbers).
Expected values are computed in f32 from the weights exactly as saved (bf16 weights upcast), so mitune, which casts
stored weights to f32, must match them to float rounding.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
IMG = FIX / "images"
torch.manual_seed(0)

VICUNA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% elif message['role'] == 'assistant' %}"
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus():
    """Real English text shipped with Python and its packages (offline)."""
    import this  # noqa: F401  (prints the Zen; we decode it below)
    import codecs
    import inspect
    import json as j
    import pathlib

    texts = [codecs.decode(this.s, "rot13")]
    for mod in (j, pathlib, inspect):
        texts.append(inspect.getsource(mod))
    texts.append("USER: What is in the image? ASSISTANT: A photo of an astronaut holding a flag. " * 20)
    texts.append("Describe the picture. The cat sits on the mat. A cup of coffee on a table. " * 20)
    return texts


def train_tokenizer(specials, add_bos):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def photos():
    """Real photos from scikit-image: two at the encoder's size, one non-square."""
    from skimage import data
    IMG.mkdir(parents=True, exist_ok=True)
    astro = Image.fromarray(data.astronaut()).resize((32, 32), Image.BICUBIC)
    coffee = Image.fromarray(data.coffee()).resize((32, 32), Image.BICUBIC)
    cat = Image.fromarray(data.chelsea()).resize((75, 50), Image.BICUBIC)  # 3:2, non-square
    astro.save(IMG / "astronaut_32.png")
    coffee.save(IMG / "coffee_32.png")
    cat.save(IMG / "chelsea_75x50.png")
    return {"astronaut": astro, "coffee": coffee, "chelsea": cat}


def fast_tokenizer(tok, bos, eos, pad, extra):
    from transformers import PreTrainedTokenizerFast
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                unk_token=None, extra_special_tokens=extra)
    return t


def build_clip_llama(imgs):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], add_bos=True)
    ftok = fast_tokenizer(tok, "<s>", "</s>", "<pad>", {"image_token": "<image>"})
    ftok.chat_template = VICUNA_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(ftok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=ftok.bos_token_id, eos_token_id=ftok.eos_token_id,
                       pad_token_id=ftok.pad_token_id,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ftok.convert_tokens_to_ids("<image>"),
                      projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=16)
    model = LlavaForConditionalGeneration(cfg).eval()
    improc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=improc, tokenizer=ftok, patch_size=8,
                          vision_feature_select_strategy="default", chat_template=VICUNA_TEMPLATE,
                          num_additional_image_tokens=1)
    return model, proc, "f32"


def build_siglip_qwen2(imgs):
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config,
                              SiglipImageProcessor, SiglipVisionConfig)
    tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], add_bos=False)
    ftok = fast_tokenizer(tok, None, "<|im_end|>", "<|endoftext|>", {"image_token": "<image>"})
    ftok.chat_template = CHATML_TEMPLATE
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    text = Qwen2Config(vocab_size=len(ftok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       eos_token_id=ftok.eos_token_id, pad_token_id=ftok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ftok.convert_tokens_to_ids("<image>"),
                      projector_hidden_act="gelu", vision_feature_layer=[-2, -1],
                      vision_feature_select_strategy="full", image_seq_length=16, tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(cfg).eval()
    # bf16 storage: round weights to bf16, compute references in f32 from exactly those values.
    model = model.to(torch.bfloat16).to(torch.float32)
    improc = SiglipImageProcessor(size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=improc, tokenizer=ftok, patch_size=8,
                          vision_feature_select_strategy="full", chat_template=CHATML_TEMPLATE,
                          num_additional_image_tokens=0)
    return model, proc, "bf16"


TAIL = 16  # logits are stored for each row's last 16 positions (the fixture budget; tests compare those)


def logits_of(model, ids, pixel_values=None, attention_mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, attention_mask=attention_mask)
    return out.logits.float()[:, -TAIL:]


def cases(name, model, proc, imgs, storage):
    d = FIX / name
    d.mkdir(parents=True, exist_ok=True)
    if storage == "bf16":
        model.to(torch.bfloat16).save_pretrained(d, max_shard_size="60KB")
        model.to(torch.float32)
    else:
        model.save_pretrained(d)
    proc.save_pretrained(d)
    tensors, meta = {}, {"model": name, "storage": storage}
    tok = proc.tokenizer

    def enc(text, images=None, **kw):
        return proc(text=text, images=images, return_tensors="pt", **kw)

    # 1. image + text (raw prompt)
    p1 = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"
    b = enc(p1, [imgs["astronaut"]])
    tensors["image_text.pixel_values"] = b["pixel_values"].contiguous()
    tensors["image_text.logits"] = logits_of(model, b["input_ids"], b["pixel_values"])[0].contiguous()
    meta["image_text"] = {"prompt": p1, "images": ["astronaut_32.png"], "input_ids": b["input_ids"][0].tolist()}

    # 2. text only
    p2 = "The cat sits on the mat and looks at the coffee."
    b = enc(p2)
    tensors["text_only.logits"] = logits_of(model, b["input_ids"])[0].contiguous()
    meta["text_only"] = {"prompt": p2, "input_ids": b["input_ids"][0].tolist()}

    # 3. two images
    p3 = "USER: <image> and <image>\nCompare the two pictures. ASSISTANT:"
    b = enc(p3, [imgs["astronaut"], imgs["coffee"]])
    tensors["two_images.pixel_values"] = b["pixel_values"].contiguous()
    tensors["two_images.logits"] = logits_of(model, b["input_ids"], b["pixel_values"])[0].contiguous()
    meta["two_images"] = {"prompt": p3, "images": ["astronaut_32.png", "coffee_32.png"],
                          "input_ids": b["input_ids"][0].tolist()}

    # 4. padded batch: one sample with an image, one text-only and shorter; left padding as for generation
    tok.padding_side = "left"
    texts = ["USER: <image>\nDescribe the photo in detail. ASSISTANT:", "USER: Hello there! ASSISTANT:"]
    b = enc(texts, [imgs["coffee"]], padding=True)
    tensors["batch.pixel_values"] = b["pixel_values"].contiguous()
    lg = logits_of(model, b["input_ids"], b["pixel_values"], b["attention_mask"])
    tensors["batch.logits"] = lg.contiguous()
    meta["batch"] = {"prompts": texts, "images": [["coffee_32.png"], []], "padding_side": "left",
                     "input_ids": b["input_ids"].tolist(), "attention_mask": b["attention_mask"].tolist()}

    # 5. greedy generation from case 1 (raw prompt), with log-probs of the generated ids
    b = enc(p1, [imgs["astronaut"]])
    with torch.no_grad():
        g = model.generate(**b, max_new_tokens=8, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = g.sequences[0, b["input_ids"].shape[1]:].tolist()
    lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, new)]
    meta["greedy"] = {"prompt": p1, "images": ["astronaut_32.png"], "max_new_tokens": 8,
                      "output_ids": new, "logprobs": lps}

    # 6. chat-templated prompt ids (one user turn + generation prompt), as `mitune generate` without --raw
    msgs = [{"role": "user", "content": "<image>\nWhat is this?"}]
    rendered = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # the template renders BOS itself, so (as apply_chat_template(tokenize=True)) no special tokens are added
    b = enc(rendered, [imgs["astronaut"]], add_special_tokens=False)
    meta["chat"] = {"user": "<image>\nWhat is this?", "rendered": rendered, "input_ids": b["input_ids"][0].tolist()}

    # 7. masked next-token loss (prompt masked with -100, response tokens scored) and one connector gradient
    b = enc(p1 + " An astronaut in a white suit.", [imgs["astronaut"]])
    labels = b["input_ids"].clone()
    n_prompt = len(meta["image_text"]["input_ids"])
    labels[0, :n_prompt] = -100
    model.zero_grad()
    out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], labels=labels)
    out.loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    tensors["loss.grad_linear_1_weight"] = grad.float().contiguous()
    tensors["loss.pixel_values"] = b["pixel_values"].contiguous()
    meta["loss"] = {"input_ids": b["input_ids"][0].tolist(), "labels": labels[0].tolist(),
                    "loss": out.loss.item(), "images": ["astronaut_32.png"]}
    model.zero_grad()

    # 8. preprocessing of the non-square photo with this model's image processor
    pv = proc.image_processor(images=[imgs["chelsea"]], return_tensors="pt")["pixel_values"]
    tensors["preprocess.chelsea"] = pv.contiguous()
    meta["preprocess"] = {"image": "chelsea_75x50.png"}

    # 9. the same encoder and LLM as standalone transformers directories (CLIPVisionModel / LlamaForCausalLM ...),
    #    for composing a model from parts with a fresh connector
    parts = FIX / (name + "_parts")
    vt = model.model.vision_tower
    vt.save_pretrained(parts / "encoder")
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_config(model.config.text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.save_pretrained(parts / "llm")
    # 10. direct resolution scaling: a 64 px input through the 32 px tower, position embeddings interpolated
    #     (bicubic, align_corners=False) by transformers' interpolate_pos_encoding; LLaVA's selected features
    g = torch.Generator().manual_seed(1)
    hires = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        hs = vt(pixel_values=hires, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    layers = model.config.vision_feature_layer
    layers = layers if isinstance(layers, list) else [layers]
    drop = 1 if model.config.vision_feature_select_strategy == "default" else 0
    tensors["hires.pixel_values"] = hires.contiguous()
    tensors["hires.features"] = torch.cat([hs[l][:, drop:] for l in layers], -1).contiguous()
    meta["parts"] = {"encoder_class": type(vt).__name__, "llm_class": type(lm).__name__}

    save_file(tensors, str(d / "expected.safetensors"))
    (d / "expected.json").write_text(json.dumps(meta, indent=1))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params; greedy {new}")


def roundtrip(saved_dir, fixture_dir):
    """Loads a mitune-saved checkpoint with transformers and compares logits with the fixture's."""
    from transformers import LlavaForConditionalGeneration
    from safetensors.torch import load_file
    fixture_dir = Path(fixture_dir)
    meta = json.loads((fixture_dir / "expected.json").read_text())
    exp = load_file(str(fixture_dir / "expected.safetensors"))
    model = LlavaForConditionalGeneration.from_pretrained(saved_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([meta["image_text"]["input_ids"]])
    got = logits_of(model, ids, exp["image_text.pixel_values"])[0]
    err = (got - exp["image_text.logits"]).abs().max().item()
    res = {"checked_with": "transformers " + __import__("transformers").__version__, "saved_by": "mitune",
           "fixture": fixture_dir.name, "max_abs_logit_diff": err, "ok": err < 1e-4}
    out = fixture_dir / "roundtrip_check.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) >= 2 and sys.argv[1] == "build":
        imgs = photos()
        for name, builder in (("llava_clip_llama", build_clip_llama), ("llava_siglip_qwen2", build_siglip_qwen2)):
            torch.manual_seed(0)
            model, proc, storage = builder(imgs)
            cases(name, model, proc, imgs, storage)
    elif len(sys.argv) == 4 and sys.argv[1] == "roundtrip":
        sys.exit(roundtrip(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
