"""Checks that a LoRA adapter mitune saved loads in the `peft` package onto the transformers model, with the same
logits as the merged model mitune wrote beside it (run by hand; CI needs no Python):

    python tools/check_peft.py checkpoints/runs/llava-hf-lora/lora [--out tests/fixtures/peft_check.json]

Works for every family mitune saves a PEFT adapter for (LLaVA, LLaVA-NeXT, Qwen2-VL, ...): the class comes from the
stage's config.json through `AutoModelForImageTextToText`.

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
from transformers import AutoModelForImageTextToText as LlavaForConditionalGeneration


def inputs(cfg):
    """An image + text prompt for the model family: LLaVA's fixed count of `<image>` placeholders and one image at
    the tower's size, or Qwen2-VL's wrapped 2 × 2 merged tokens with their patches and grid."""
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl"):
        v = cfg.vision_config
        grid = [1, 2 * v.spatial_merge_size, 2 * v.spatial_merge_size]
        n = grid[1] * grid[2] // v.spatial_merge_size ** 2
        ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id] + list(range(10, 40))
        patches = torch.randn(grid[1] * grid[2], v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
        return {"input_ids": torch.tensor([ids]), "pixel_values": patches, "image_grid_thw": torch.tensor([grid]),
                "mm_token_type_ids": torch.tensor([[int(i == cfg.image_token_id) for i in ids]])}
    n = cfg.image_seq_length
    size = cfg.vision_config.image_size
    ids = [1] + [cfg.image_token_index] * n + list(range(10, 40))
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, size, size)}


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
    x = inputs(base.config)
    with torch.no_grad():
        base_logits = base(**x).logits
    peft_model = PeftModel.from_pretrained(base, f"{a.stage}/adapter").eval()
    n_lora = sum(1 for k, _ in peft_model.named_parameters() if "lora_A" in k)
    with torch.no_grad():
        adapted = peft_model(**x).logits
    merged_model = LlavaForConditionalGeneration.from_pretrained(f"{a.stage}/model", dtype=torch.float32).eval()
    with torch.no_grad():
        merged = merged_model(**x).logits
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
            got = on_init(**x).logits
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
