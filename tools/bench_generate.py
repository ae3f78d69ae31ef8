"""transformers side of `mitune bench generate --preset NAME --json`: the same LLaVA presets (random weights,
f32), one image + 32 text tokens per prompt (rows 32, 30, 28, 26 text tokens, left-padded), 32 new tokens, greedy
`generate` with the KV cache, batch 1 and 8; median of 3 runs after a warm-up.

    python tools/bench_generate.py [tiny|small]        (run by hand; CI never needs Python)
"""
import json
import sys
import time

import torch
from bench_common import cpu_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

PRESETS = [
    ("tiny", (32, 64, 3, 2, 8, 32), (512, 48, 96, 2, 4, 2, True), -1),
    ("small", (384, 1536, 12, 6, 16, 224), (32000, 768, 2048, 8, 12, 4, False), -2),
]
TEXT, NEW = 32, 32


def build(p):
    (d, f, l, h, patch, size), (vocab, ld, lf, ll, lh, kv, tied), layer = p[1], p[2], p[3]
    vision = CLIPVisionConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=l, num_attention_heads=h,
                              patch_size=patch, image_size=size, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab, hidden_size=ld, intermediate_size=lf, num_hidden_layers=ll,
                       num_attention_heads=lh, num_key_value_heads=kv, tie_word_embeddings=tied,
                       rms_norm_eps=1e-6, max_position_embeddings=2048, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                      vision_feature_layer=layer, vision_feature_select_strategy="default",
                      image_seq_length=(size // patch) ** 2, tie_word_embeddings=tied)
    cfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg).float().eval(), (size // patch) ** 2, size, vocab


def inputs(n, n_img, size, vocab):
    """Row r: one image + 32 - 2 (r mod 4) text tokens, left-padded; its pixels. (ids, attention mask, pixels)"""
    rows = []
    for r in range(n):
        k = TEXT - 2 * (r % 4)
        rows.append([vocab - 1] * n_img + [1 + (i * 7 + r) % (vocab - 2) for i in range(k)])
    t = max(len(x) for x in rows)
    ids = torch.tensor([[0] * (t - len(x)) + x for x in rows])
    mask = torch.tensor([[0] * (t - len(x)) + [1] * len(x) for x in rows])
    pixels = torch.stack([(torch.arange(3 * size * size) + r) % 255 for r in range(n)]).float()
    return ids, mask, pixels.reshape(n, 3, size, size) / 127.0 - 1.0


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else None
    torch.manual_seed(0)
    for p in PRESETS:
        if only and p[0] != only:
            continue
        model, n_img, size, vocab = build(p)
        for batch in (1, 8):
            ids, mask, pixels = inputs(batch, n_img, size, vocab)
            t = ids.shape[1]
            times = []
            for i in range(4):
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                         max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                         pad_token_id=0)
                assert out.shape[1] == t + NEW
                if i > 0:
                    times.append(time.perf_counter() - t0)
            times.sort()
            med = times[len(times) // 2]
            print(json.dumps({
                "framework": "transformers", "torch": torch.__version__, "threads": torch.get_num_threads(),
                "preset": p[0], "batch": batch, "image_tokens": n_img, "prompt_tokens": n_img + TEXT,
                "new_tokens": NEW, "seconds_median": med, "generated_tokens_per_s": batch * NEW / med, "cpu": cpu_model(),
            }), flush=True)


if __name__ == "__main__":
    main()
