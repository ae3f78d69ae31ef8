"""PyTorch + transformers side of `mitune bench train --preset NAME --json`: the same LLaVA presets, f32,
one AdamW step per batch, median step time after warm-up, tokens/s and peak RSS.

    python tools/bench_train.py [tiny|small-align|small-instruct|small-lora|1b]  (run by hand; CI never needs Python)

small-lora: small-instruct with PEFT LoRA (r = 8, alpha = 16) on every LLM projection and the projector trained
in full (modules_to_save), as mitune's `adapter = { kind = "lora", ... }` with `train = ["connector"]`.
1b: CLIP ViT-L/14-336 (576 image tokens) + a TinyLlama-1.1B-shaped LLM, LoRA r = 16 (alpha 32) the same way,
batch 1.

Both print JSON lines with the same fields, so the two can be run one after the other on the same machine and
compared (README "Performance").
"""
import json
import resource
import sys
import time

import torch
from bench_common import cpu_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

PRESETS = [
    # name, vision (hidden, inter, layers, heads, patch, size), llm (vocab, hidden, inter, layers, heads, kv, tied),
    # feature layer, batch, text tokens, trained parts, warmup, steps
    ("tiny", (32, 64, 3, 2, 8, 32), (512, 48, 96, 2, 4, 2, True), -1, 8, 64, ("encoder", "connector", "llm"), 3, 20),
    ("small-align", (384, 1536, 12, 6, 16, 224), (32000, 768, 2048, 8, 12, 4, False), -2, 4, 128, ("connector",), 1, 3),
    ("small-instruct", (384, 1536, 12, 6, 16, 224), (32000, 768, 2048, 8, 12, 4, False), -2, 4, 128, ("connector", "llm"), 1, 3),
    ("small-lora", (384, 1536, 12, 6, 16, 224), (32000, 768, 2048, 8, 12, 4, False), -2, 4, 128, ("connector",), 1, 3),
    ("1b", (1024, 4096, 24, 16, 14, 336), (32000, 2048, 5632, 22, 32, 4, False), -2, 1, 128, ("connector",), 1, 2),
]
LORA_RANK = {"small-lora": 8, "1b": 16}


def build(p):
    (d, f, l, h, patch, size), (vocab, ld, lf, ll, lh, kv, tied), layer = p[1], p[2], p[3]
    vision = CLIPVisionConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=l, num_attention_heads=h,
                              patch_size=patch, image_size=size, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab, hidden_size=ld, intermediate_size=lf, num_hidden_layers=ll,
                       num_attention_heads=lh, num_key_value_heads=kv, tie_word_embeddings=tied,
                       rms_norm_eps=1e-6, max_position_embeddings=2048)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                      vision_feature_layer=layer, vision_feature_select_strategy="default",
                      image_seq_length=(size // patch) ** 2, tie_word_embeddings=tied)
    cfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg).float(), (size // patch) ** 2, size, vocab


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else None
    torch.manual_seed(0)
    for p in PRESETS:
        if only and p[0] != only:
            continue
        model, n_img, size, vocab = build(p)
        batch, text, parts, warmup, steps = p[4], p[5], p[6], p[7], p[8]
        prefixes = {"encoder": ("vision_tower", "model.vision_tower"),
                    "connector": ("multi_modal_projector", "model.multi_modal_projector"),
                    "llm": ("language_model", "model.language_model", "lm_head")}
        trained = tuple(x for part in parts for x in prefixes[part])
        for name, prm in model.named_parameters():
            prm.requires_grad_(name.startswith(trained))
        if p[0] in LORA_RANK:
            from peft import LoraConfig, get_peft_model
            r = LORA_RANK[p[0]]
            model = get_peft_model(model, LoraConfig(
                r=r, lora_alpha=2 * r, lora_dropout=0.0, modules_to_save=["multi_modal_projector"],
                target_modules=r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
        row = [vocab - 1] * n_img + [1 + (i * 7) % (vocab - 2) for i in range(text)]
        ids = torch.tensor([row] * batch)
        labels = ids.clone()
        labels[:, :n_img] = -100
        pixels = (torch.arange(batch * 3 * size * size) % 255).float().reshape(batch, 3, size, size) / 127.0 - 1.0
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            out = model(input_ids=ids, pixel_values=pixels, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        seq = n_img + text
        print(json.dumps({
            "framework": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(), "preset": p[0],
            "params": sum(q.numel() for q in model.parameters()),
            "trainable": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "batch": batch, "seq": seq, "image_tokens": n_img, "step_s_median": med,
            "tokens_per_s": batch * seq / med,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu": cpu_model(),
        }), flush=True)


if __name__ == "__main__":
    main()
