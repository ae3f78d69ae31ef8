"""transformers side of `mitune bench rollout --preset NAME --json`: the LLaVA presets of tools/bench_generate.py
(random weights, f32), 4 prompts (one image + 32, 30, 28, 26 text tokens, left-padded) × 8 completions sampled at
temperature 1 with `generate(num_return_sequences=8)`, 32 new tokens each (min_new_tokens = 32, so no row stops);
median of 3 runs after a warm-up.

    python tools/bench_rollout.py [tiny|small]        (run by hand; CI never needs Python)
"""
import json
import sys
import time

import torch
from bench_common import cpu_model
from bench_generate import NEW, PRESETS, TEXT, build, inputs

PROMPTS, GROUP = 4, 8


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else None
    torch.manual_seed(0)
    for p in PRESETS:
        if only and p[0] != only:
            continue
        model, n_img, size, vocab = build(p)
        ids, mask, pixels = inputs(PROMPTS, n_img, size, vocab)
        t = ids.shape[1]
        times = []
        for i in range(4):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                     max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, temperature=1.0,
                                     top_p=1.0, top_k=0, num_return_sequences=GROUP, pad_token_id=0)
            assert out.shape == (PROMPTS * GROUP, t + NEW), out.shape
            if i > 0:
                times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        print(json.dumps({
            "framework": "transformers", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "preset": p[0], "prompts": PROMPTS, "group": GROUP, "image_tokens": n_img, "prompt_tokens": n_img + TEXT,
            "new_tokens": NEW, "seconds_median": med, "rollout_tokens_per_s": PROMPTS * GROUP * NEW / med,
            "cpu": cpu_model(),
        }), flush=True)


if __name__ == "__main__":
    main()
