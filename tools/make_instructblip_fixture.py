#!/usr/bin/env python3
"""InstructBLIP parity fixture (run by hand; CI never needs Python):

    /root/venv/bin/python tools/make_instructblip_fixture.py         # writes tests/fixtures/instructblip/

A tiny *random* `InstructBlipForConditionalGeneration` (BLIP vision tower, instruction-aware Q-Former, LLaMA) built
from config objects, saved with its `InstructBlipProcessor`: the LLaMA tokenizer of tests/fixtures/llava_clip_llama
(byte-level BPE with `<image>`), a BERT WordPiece Q-Former tokenizer trained here on real English text
(`qformer_tokenizer/`), and `BlipImageProcessor` at 32 px. expected.json / expected.safetensors hold, for an image +
prompt and for a padded batch of two: the processor's `input_ids` (query placeholders first), `qformer_input_ids`,
`pixel_values`, the logits, and greedy generation (ids and log-probs).
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoTokenizer, BertTokenizerFast, BlipImageProcessor, InstructBlipConfig,
                          InstructBlipForConditionalGeneration, InstructBlipProcessor)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "instructblip"
sys.path.insert(0, str(ROOT / "tools"))
torch.manual_seed(0)


def qformer_tokenizer():
    from make_fixtures import corpus
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def main():
    tok = AutoTokenizer.from_pretrained(FIX / "llava_clip_llama")
    qtok = qformer_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=len(qtok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, cross_attention_frequency=1, max_position_embeddings=64),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=4, image_token_index=image_id)
    model = InstructBlipForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():  # queries and norms away from their constant init, so a mapping bug shows; the image
        model.query_tokens.normal_(0, 0.5)  # path's weights large enough that the image moves the logits
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif not n.startswith("language_model"):
                p.normal_(0, 0.2)
    model.save_pretrained(OUT, safe_serialization=True)
    proc = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                                 tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=4)
    if isinstance(proc.image_token, str):  # transformers 5.23 reads the tokenizer's `image_token` as a str, then
        from tokenizers import AddedToken  # calls `.content` on it: wrap it as the processor expects
        proc.image_token = AddedToken(proc.image_token, normalized=False, special=True)
    proc.save_pretrained(OUT)
    images = [Image.open(FIX / "images" / n).convert("RGB") for n in ("astronaut_32.png", "chelsea_75x50.png")]
    meta, tensors = {}, {}

    def case(name, prompts, imgs):
        enc = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**enc)
        tensors[f"{name}.pixel_values"] = enc["pixel_values"].contiguous()
        tensors[f"{name}.logits"] = out.logits.contiguous()
        meta[name] = {"prompts": prompts, "input_ids": enc["input_ids"].tolist(),
                      "attention_mask": enc["attention_mask"].tolist(),
                      "qformer_input_ids": enc["qformer_input_ids"].tolist(),
                      "qformer_attention_mask": enc["qformer_attention_mask"].tolist()}
        if len(prompts) == 1:
            with torch.no_grad():
                g = model.generate(**enc, max_new_tokens=6, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
            new = g.sequences[0, enc["input_ids"].shape[1]:] if g.sequences.shape[1] > 6 else g.sequences[0]
            logprobs = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(g.scores, new)]
            meta[name]["greedy_ids"] = new.tolist()
            meta[name]["greedy_logprobs"] = logprobs

    case("image_text", ["What is in the image?"], images[:1])
    case("batch", ["What is in the image?", "Describe the cat on the mat in a few words."], images)
    save_file(tensors, OUT / "expected.safetensors")
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: {kk: v[kk] for kk in ("input_ids", "qformer_input_ids")} for k, v in meta.items()})[:1500])
    print(meta["image_text"].get("greedy_ids"))


if __name__ == "__main__":
    main()
