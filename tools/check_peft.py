"""Checks that a LoRA adapter mitune saved loads in the `peft` package onto the transformers model, with the same
logits as the merged model mitune wrote beside it (run by hand; CI needs no Python):

    python tools/check_peft.py checkpoints/runs/llava-hf-lora/lora [--out tests/fixtures/peft_check.json]

STAGE/base is the unmerged model, STAGE/adapter the PEFT adapter, STAGE/model mitune's merge. transformers loads
base, `PeftModel.from_pretrained` applies the adapter (LoRA factors + modules_to_save), and its logits on an
image + text prompt are compared with transformers' logits of STAGE/model, and with the base's (which must differ).
Together with the parity suite (mitune = transformers on full checkpoints) and tests/lora.rs (mitune's merge =
mitune's unmerged adapter), this closes the loop: mitune's adapter in PEFT = mitune's fine-tuned model.
"""
import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import LlavaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("--out")
    ap.add_argument(
        "--init",
        help="the model the stage started from: the adapter applied to it must give the same logits too "
        "(proves the fully trained modules load from the adapter's modules_to_save, not from base/)",
    )
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = LlavaForConditionalGeneration.from_pretrained(f"{a.stage}/base", dtype=torch.float32).eval()
    cfg = base.config
    n = cfg.image_seq_length
    size = cfg.vision_config.image_size
    ids = [1] + [cfg.image_token_index] * n + list(range(10, 40))
    input_ids = torch.tensor([ids])
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids, pixel_values=pixels).logits
    peft_model = PeftModel.from_pretrained(base, f"{a.stage}/adapter").eval()
    n_lora = sum(1 for k, _ in peft_model.named_parameters() if "lora_A" in k)
    with torch.no_grad():
        adapted = peft_model(input_ids=input_ids, pixel_values=pixels).logits
    merged_model = LlavaForConditionalGeneration.from_pretrained(f"{a.stage}/model", dtype=torch.float32).eval()
    with torch.no_grad():
        merged = merged_model(input_ids=input_ids, pixel_values=pixels).logits
    result = {
        "stage": a.stage,
        "lora_modules_loaded": n_lora,
        "modules_to_save": peft_model.peft_config["default"].modules_to_save,
        "max_abs_diff_peft_vs_mitune_merged": (adapted - merged).abs().max().item(),
        "max_abs_diff_peft_vs_base": (adapted - base_logits).abs().max().item(),
        "logits_shape": list(adapted.shape),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
    }
    ok = result["max_abs_diff_peft_vs_mitune_merged"] < 1e-4 and result["max_abs_diff_peft_vs_base"] > 1e-4
    if a.init:
        init = LlavaForConditionalGeneration.from_pretrained(a.init, dtype=torch.float32).eval()
        on_init = PeftModel.from_pretrained(init, f"{a.stage}/adapter").eval()
        with torch.no_grad():
            got = on_init(input_ids=input_ids, pixel_values=pixels).logits
        result["init"] = a.init
        result["max_abs_diff_peft_on_init_vs_mitune_merged"] = (got - merged).abs().max().item()
        ok = ok and result["max_abs_diff_peft_on_init_vs_mitune_merged"] < 1e-4
    result["ok"] = ok
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
