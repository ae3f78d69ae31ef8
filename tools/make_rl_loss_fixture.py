#!/usr/bin/env python3
"""GRPO-family and KTO losses and gradients in plain PyTorch + transformers on the llava_clip_llama fixture model
(run by hand; CI never needs Python): tests/parity.rs checks mitune's `grpo::token_loss` and `kto::kto_losses`
on the same model, rows and numbers against these, loss and gradients within 1e-4.

    /path/to/venv/bin/python tools/make_rl_loss_fixture.py     # writes tests/fixtures/llava_clip_llama/rl_losses.*

Rows: BOS, the 16 image tokens, a prompt and a completion (ids drawn here), one image each (pixel values drawn
here, so no preprocessing is involved); only the completion's tokens are scored. Each row runs alone (no padding).

GRPO, as TRL's GRPOTrainer `_compute_loss` writes it: per completion token, log_ratio = logp − old, coef_1 =
exp(log_ratio) (GSPO, importance_sampling_level = "sequence": exp of the completion's masked mean log_ratio, one
per row), coef_2 = clamp(coef_1, 1 − ε, 1 + ε_high), per_token = −min(coef_1·A, coef_2·A) + β·(exp(ref − logp) −
(ref − logp) − 1); then loss_type grpo: mean over rows of the masked token mean; bnpo: masked sum / mask sum;
dr_grpo: masked sum / (rows · max_completion_length); dapo: masked sum / completion tokens of the global batch.
`old` and `ref` are the policy's own log-probs shifted by fixed amounts, so ratios fall inside and outside the clip.

KTO, as TRL's KTOTrainer `kto_loss`: ρ = Σ logp − ref (sequence sums), z = max(0, mean(kl_policy − kl_reference))
(no gradient), desirable λ_D·(1 − σ(β(ρ − z))), undesirable λ_U·(1 − σ(β(z − ρ))), mean over the examples.

Gradients: d loss / d multi_modal_projector.linear_1.weight and / d layers.1.mlp.down_proj.weight (torch layout).
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "llava_clip_llama"

EPS, EPS_HIGH, BETA, MAX_NEW = 0.2, 0.28, 0.04, 6
ADV = [0.8, -0.5, 0.3]
KTO_BETA, KTO_WD, KTO_WU = 0.1, 1.0, 1.5
KTO_LABELS = [True, False, True]
KTO_REF_SHIFT = [0.3, -0.2, 0.1]
KL_POLICY, KL_REFERENCE = [-5.1, -6.3, -4.2], [-5.4, -6.0, -4.9]


def main():
    torch.manual_seed(7)
    model = LlavaForConditionalGeneration.from_pretrained(FIX, dtype=torch.float32).eval()
    cfg = model.config
    vocab, img_tok, n_img = cfg.text_config.vocab_size, cfg.image_token_index, cfg.image_seq_length
    size = cfg.vision_config.image_size
    rows, labels = [], []
    for n_prompt, n_done in [(5, 3), (3, 5), (6, 4)]:
        prompt = torch.randint(5, vocab, (n_prompt,)).tolist()
        done = torch.randint(5, vocab, (n_done,)).tolist()
        rows.append([1] + [img_tok] * n_img + prompt + done)
        labels.append([False] * (1 + n_img + n_prompt) + [True] * n_done)
    pixels = torch.randn(len(rows), 3, size, size)
    t = max(len(r) for r in rows)
    n = len(rows)

    # per-token log-probs [n, t-1] of the scored tokens (0 elsewhere), each row alone
    def token_logps():
        out = torch.zeros(n, t - 1)
        mask = torch.zeros(n, t - 1)
        for i, (ids, lab) in enumerate(zip(rows, labels)):
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels[i:i + 1]).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            m = torch.tensor([float(x) for x in lab[1:]])
            out = out.index_put((torch.tensor([i]), torch.arange(len(ids) - 1)), lp * m)
            mask[i, : len(ids) - 1] = m
        return out, mask

    params = {
        "linear_1": model.model.multi_modal_projector.linear_1.weight,
        "down_proj": model.model.language_model.layers[1].mlp.down_proj.weight,
    }
    tensors, meta = {}, {"rows": rows, "labels": labels, "advantages": ADV, "epsilon": EPS, "epsilon_high": EPS_HIGH,
                         "kl_beta": BETA, "max_new_tokens": MAX_NEW, "grpo": {}}
    tensors["pixel_values"] = pixels.contiguous()
    with torch.no_grad():
        base, mask = token_logps()
    g = torch.Generator().manual_seed(3)
    old = (base + (torch.rand(n, t - 1, generator=g) - 0.5) * 0.6) * mask
    ref = (base + (torch.rand(n, t - 1, generator=g) - 0.5) * 0.4) * mask
    tensors["grpo.old"] = old.contiguous()
    tensors["grpo.ref"] = ref.contiguous()
    adv = torch.tensor(ADV)[:, None]
    tokens = mask.sum()
    for level in ["token", "sequence"]:
        for kind in ["grpo", "bnpo", "dr_grpo", "dapo"]:
            model.zero_grad()
            logp, _ = token_logps()
            log_ratio = logp - old
            if level == "sequence":
                log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
            c1 = torch.exp(log_ratio)
            c2 = torch.clamp(c1, 1 - EPS, 1 + EPS_HIGH)
            d = ref - logp
            per_token = -torch.min(c1 * adv, c2 * adv) + BETA * (torch.exp(d) - d - 1)
            if kind == "grpo":
                loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
            elif kind == "bnpo":
                loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
            elif kind == "dr_grpo":
                loss = (per_token * mask).sum() / (n * MAX_NEW)
            else:
                loss = (per_token * mask).sum() / tokens
            loss.backward()
            key = f"{level}.{kind}"
            meta["grpo"][key] = loss.item()
            for name, p in params.items():
                tensors[f"grpo.{key}.grad.{name}"] = p.grad.detach().clone().contiguous()

    # KTO: sequence log-prob sums of the rows
    model.zero_grad()
    logp, _ = token_logps()
    seq = logp.sum(-1)
    reference = seq.detach() + torch.tensor(KTO_REF_SHIFT)
    z = max(0.0, (torch.tensor(KL_POLICY) - torch.tensor(KL_REFERENCE)).mean().item())
    rho = seq - reference
    losses = []
    for i, desirable in enumerate(KTO_LABELS):
        if desirable:
            losses.append(KTO_WD * (1 - torch.sigmoid(KTO_BETA * (rho[i] - z))))
        else:
            losses.append(KTO_WU * (1 - torch.sigmoid(KTO_BETA * (z - rho[i]))))
    loss = torch.stack(losses).mean()
    loss.backward()
    meta["kto"] = {"beta": KTO_BETA, "desirable_weight": KTO_WD, "undesirable_weight": KTO_WU,
                   "labels": KTO_LABELS, "reference": reference.tolist(), "kl_policy": KL_POLICY,
                   "kl_reference": KL_REFERENCE, "z": z, "loss": loss.item()}
    for name, p in params.items():
        tensors[f"kto.grad.{name}"] = p.grad.detach().clone().contiguous()

    save_file(tensors, str(FIX / "rl_losses.safetensors"))
    (FIX / "rl_losses.json").write_text(json.dumps(meta, indent=1) + "\n")
    print({k: round(v, 6) for k, v in meta["grpo"].items()}, "kto", round(meta["kto"]["loss"], 6))


if __name__ == "__main__":
    main()
