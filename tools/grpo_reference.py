"""GRPO in plain PyTorch + transformers on the shapes world's yes/no probes, beside mitune's `grpo` stage (run by hand).

Why: mitune's GRPO with the `yes_no` reward on the probe prompts raises POPE "yes" to absent objects; this checks
that GRPO does the same outside mitune. TRL's GRPO loss: G completions per prompt sampled at temperature 1
(transformers' generate, max 8 new tokens), reward 1 when the POPE yes/no reading of the answer is right,
advantages (r - mean) / (std + 1e-4) within the group (unbiased std), one update per batch (ratio 1, gradient of
A * log pi), k3 KL to the frozen start (beta 0.04), per-completion token mean, AdamW, clipping at 1, vision tower
frozen. Sampling and data order differ from mitune's, so results agree in direction and size, not bit for bit.

    python tools/grpo_reference.py            # from the repository root, after the quickstart

Needs: torch, transformers >= 5, pillow; checkpoints/runs/quickstart and datasets/shapes.
"""
import argparse, collections, json, math, random
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

ap = argparse.ArgumentParser()
ap.add_argument('--lr', type=float, default=2e-5); ap.add_argument('--steps', type=int, default=48)
ap.add_argument('--prompts', type=int, default=16); ap.add_argument('--group', type=int, default=4)
ap.add_argument('--kl', type=float, default=0.04); ap.add_argument('--seed', type=int, default=0)
a = ap.parse_args()
torch.manual_seed(a.seed); random.seed(a.seed)
root = ''; md = 'checkpoints/runs/quickstart/instruct/model'
tok = AutoTokenizer.from_pretrained(md); proc = CLIPImageProcessor.from_pretrained(md)
tmpl = open(md + '/chat_template.jinja').read()
def render(prompt):
    return tok.apply_chat_template([{'role': 'user', 'content': prompt}], chat_template=tmpl,
                                   add_generation_prompt=True, tokenize=False).replace('<image>', '<image>' * 4)
pxc = {}
def px(p):
    if p not in pxc: pxc[p] = proc(Image.open(p).convert('RGB'), return_tensors='pt').pixel_values[0]
    return pxc[p]
def is_yes(ans):
    first = ans.split('.')[0].replace(',', '')
    return not any(w in ('No', 'no', 'not') for w in first.split(' '))
rows = [json.loads(l) for l in open(root + 'datasets/shapes/preference_probes_train.jsonl')]
random.shuffle(rows)
pol = LlavaForConditionalGeneration.from_pretrained(md); ref = LlavaForConditionalGeneration.from_pretrained(md).eval()
for p in pol.model.vision_tower.parameters(): p.requires_grad = False
params = [p for p in pol.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
eos = tok.eos_token_id
def token_logps(m, ids, pix, att):
    lg = m(input_ids=ids, pixel_values=pix, attention_mask=att).logits[:, :-1]
    return lg.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
for st in range(a.steps):
    batch = rows[st * a.prompts:(st + 1) * a.prompts]
    seqs, masks, pixs, rewards = [], [], [], []
    pol.eval()
    for r in batch:
        ids = tok(render(r['prompt']), add_special_tokens=False).input_ids
        pix = px(root + 'datasets/shapes/' + r['image'])
        with torch.no_grad():
            out = pol.generate(input_ids=torch.tensor([ids] * a.group), pixel_values=pix[None].repeat(a.group, 1, 1, 1),
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, eos_token_id=eos,
                               pad_token_id=tok.pad_token_id)
        for o in out:
            comp = o[len(ids):].tolist()
            if eos in comp: comp = comp[:comp.index(eos) + 1]
            text = tok.decode([t for t in comp if t != eos])
            ans = text.strip().split('\n')[0].strip()
            rewards.append(float(is_yes(ans) == (r['chosen'] == 'yes')))
            seqs.append(ids + comp); masks.append([0] * len(ids) + [1] * len(comp)); pixs.append(pix)
    R = torch.tensor(rewards).view(-1, a.group)
    adv = ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-4)).view(-1)
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tok.pad_token_id); mask = torch.zeros(len(seqs), L); att = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s); mask[i, :len(s)] = torch.tensor(m, dtype=torch.float); att[i, :len(s)] = 1
    pix = torch.stack(pixs); mask = mask[:, 1:]
    pol.train()
    lp = token_logps(pol, ids, pix, att)
    with torch.no_grad(): rlp = token_logps(ref, ids, pix, att)
    ratio = (lp - lp.detach()).exp()
    per = -(ratio * adv[:, None])
    d = rlp - lp; kl = d.exp() - d - 1
    per = per + a.kl * kl
    loss = ((per * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if st % 8 == 0 or st == a.steps - 1:
        print(f'step {st + 1} reward {R.mean():.3f} kl {((kl * mask).sum() / mask.sum()):.4f}', flush=True)
pol.eval()
yes = tok(' yes', add_special_tokens=False).input_ids[-1]; no = tok(' no', add_special_tokens=False).input_ids[-1]
for split in ('popular', 'adversarial', 'random'):
    c = collections.Counter()
    for l in open(root + f'datasets/shapes/eval/heldout/pope_{split}.json'):
        r = json.loads(l)
        ids = torch.tensor([tok(render('<image>\n' + r['text'] + '\nAnswer yes or no.'), add_special_tokens=False).input_ids])
        for name, m in (('before', ref), ('after', pol)):
            with torch.no_grad(): top = m(input_ids=ids, pixel_values=px(root + 'datasets/shapes/eval/heldout/' + r['image'])[None]).logits[0, -1].argmax().item()
            c[(name, r['label'], {yes: 'yes', no: 'no'}.get(top, 'other'))] += 1
    for name in ('before', 'after'):
        na = sum(c[(name, 'no', k)] for k in ('yes', 'no', 'other')); fp = c[(name, 'no', 'yes')]
        npr = sum(c[(name, 'yes', k)] for k in ('yes', 'no', 'other')); tp = c[(name, 'yes', 'yes')]
        print(f'pope_{split:12s} {name:6s}: yes to absent {fp}/{na} = {100 * fp / na:.1f}%  recall {100 * tp / npr:.1f}%')
