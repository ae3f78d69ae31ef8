"""DPO in plain PyTorch + transformers on the shapes world, beside mitune's `dpo` stage (run by hand; CI never needs it).

Why: a check that what mitune's DPO stage does to the quickstart model (POPE "yes" to absent objects before and
after) is DPO's behaviour and not mitune's. Same model (the quickstart's instruct directory, loaded by
transformers' LlavaForConditionalGeneration), same pairs, template, loss (TRL's sigmoid DPO: -log sigmoid(beta * h),
h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), summed over the response tokens), optimiser (AdamW, no
weight decay, warmup 10% then cosine, global-norm clipping at 1), batch of 32 pairs, vision tower frozen. The data
order differs (Python's shuffle), so numbers agree in direction and size, not bit for bit.

    python tools/dpo_reference.py --beta 0.1 --lr 3e-5 --epochs 1   # TRL's defaults: "yes" to absent objects rises
    python tools/dpo_reference.py --beta 1 --lr 1e-4 --epochs 2      # recipes/quickstart-align.toml: it falls

Needs: torch, transformers >= 5, pillow; the quickstart run (checkpoints/runs/quickstart) and datasets/shapes.
"""
import argparse
import collections
import json
import math
import random

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="checkpoints/runs/quickstart/instruct/model")
ap.add_argument("--world", default="datasets/shapes")
ap.add_argument("--pairs", default="preference_probes_train.jsonl", help="file in --world")
ap.add_argument("--beta", type=float, default=1.0)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--epochs", type=int, default=2)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.manual_seed(a.seed)
random.seed(a.seed)

tok = AutoTokenizer.from_pretrained(a.model)
proc = CLIPImageProcessor.from_pretrained(a.model)
template = open(f"{a.model}/chat_template.jinja").read()
n_image_tokens = json.load(open(f"{a.model}/config.json"))["image_seq_length"]


def render(messages, generation_prompt):
    text = tok.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=generation_prompt, tokenize=False
    )
    return text.replace("<image>", "<image>" * n_image_tokens)


def encode(text):
    return tok(text, add_special_tokens=False).input_ids


def sequence(prompt, response):
    """Token ids of prompt + response and the mask of the response tokens (as mitune: the assistant span)."""
    user = [{"role": "user", "content": prompt}]
    head = encode(render(user, True))
    full = encode(render(user + [{"role": "assistant", "content": response}], False))
    assert full[: len(head)] == head, "the template must render the prompt as a prefix"
    return full, [0] * len(head) + [1] * (len(full) - len(head))


pixels = {}


def image(path):
    if path not in pixels:
        pixels[path] = proc(Image.open(path).convert("RGB"), return_tensors="pt").pixel_values[0]
    return pixels[path]


def logps(model, rows):
    """Summed response log-probs of chosen and rejected, both in one batch: ([B], [B])."""
    seqs = [sequence(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros(len(seqs), width)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (s, m) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = torch.tensor(m, dtype=torch.float)
        attention[i, : len(s)] = 1
    pix = torch.stack([image(f"{a.world}/{r['image']}") for r in rows for _ in range(2)])
    logits = model(input_ids=ids, pixel_values=pix, attention_mask=attention).logits[:, :-1]
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    s = token_logps.sum(-1)
    return s[0::2], s[1::2]


policy = LlavaForConditionalGeneration.from_pretrained(a.model)
reference = LlavaForConditionalGeneration.from_pretrained(a.model).eval()
for p in policy.model.vision_tower.parameters():
    p.requires_grad = False
params = [p for p in policy.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)

rows = [json.loads(line) for line in open(f"{a.world}/{a.pairs}")]
order = []
for _ in range(a.epochs):
    epoch = list(range(len(rows)))
    random.shuffle(epoch)
    order += epoch
steps = len(order) // a.batch
warmup = math.ceil(0.1 * steps)
policy.train()
for step in range(steps):
    if step < warmup:
        lr = a.lr * (step + 1) / warmup
    else:
        lr = a.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr
    batch = [rows[i] for i in order[step * a.batch : (step + 1) * a.batch]]
    pc, pr = logps(policy, batch)
    with torch.no_grad():
        rc, rr = logps(reference, batch)
    h = (pc - rc) - (pr - rr)
    loss = -F.logsigmoid(a.beta * h).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 20 == 0 or step == steps - 1:
        print(f"step {step + 1}/{steps} loss {loss.item():.4f} accuracy {(h > 0).float().mean():.3f} "
              f"margin {(a.beta * h).mean():.3f}", flush=True)
policy.eval()

# POPE held-out: the greedy first answer token (the quickstart model answers " yes" / " no" and stops)
yes, no = encode(" yes")[-1], encode(" no")[-1]
for split in ("popular", "adversarial", "random"):
    counts = collections.Counter()
    for line in open(f"{a.world}/eval/heldout/pope_{split}.json"):
        r = json.loads(line)
        ids = torch.tensor([encode(render([{"role": "user", "content": f"<image>\n{r['text']}\nAnswer yes or no."}], True))])
        pix = image(f"{a.world}/eval/heldout/{r['image']}")[None]
        for name, model in (("before", reference), ("after", policy)):
            with torch.no_grad():
                top = model(input_ids=ids, pixel_values=pix).logits[0, -1].argmax().item()
            counts[(name, r["label"], {yes: "yes", no: "no"}.get(top, "other"))] += 1
    for name in ("before", "after"):
        absent = sum(counts[(name, "no", k)] for k in ("yes", "no", "other"))
        present = sum(counts[(name, "yes", k)] for k in ("yes", "no", "other"))
        fp, tp = counts[(name, "no", "yes")], counts[(name, "yes", "yes")]
        print(f"pope_{split:12s} {name:6s}: accuracy {100 * (counts[(name, 'no', 'no')] + tp) / (absent + present):.1f}  "
              f"yes to absent {fp}/{absent} = {100 * fp / absent:.1f}%  recall {100 * tp / present:.1f}%")
