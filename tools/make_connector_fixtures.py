#!/usr/bin/env python3
"""Parity fixtures for mitune's connectors against transformers' own modules (run by hand; CI never needs Python).

    python3 -m venv /root/venv && /root/venv/bin/pip install torch transformers safetensors numpy
    /root/venv/bin/python tools/make_connector_fixtures.py        # writes tests/fixtures/connectors/

For each connector, a tiny *random* transformers module built from a config object (never from the hub), f32:
  - idefics2.safetensors: `Idefics2Connector` (gated-MLP modality projection + perceiver resampler, GQA heads)
  - idefics3.safetensors: `Idefics3Connector` (pixel shuffle, scale 2, + linear)
  - instructblip_qformer.safetensors: InstructBLIP's instruction-aware path — `query_tokens`,
    `InstructBlipQFormerModel` (the instruction's ids join the queries; the second row's instruction is padded) and
    `language_projection`; extra tensors `qformer_input_ids` / `qformer_attention_mask`
  - blip2_qformer.safetensors: `Blip2ForConditionalGeneration`'s connector path — `query_tokens`, `Blip2QFormerModel`
    (3 layers, cross-attention every 2nd) and `language_projection`, as its `get_image_features` runs them
Each file holds the module's weights under their transformers names, `input` (encoder features [n, tokens, width]:
a batch of two images), `output` (connector features [n, tokens_out, d_llm]), `probe` (a fixed random tensor of the
output's shape) and `grad.<name>` = d sum(output · probe) / d <name> for every weight, and its config (JSON in the
safetensors metadata, key `config`), so the Rust test rebuilds the same spec.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Blip2QFormerConfig, Idefics2Config, Idefics3Config, InstructBlipQFormerConfig
from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel
from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "connectors"
torch.manual_seed(0)


def randomize(module):
    # transformers initialises norms to ones and latents to ones: draw everything so a wrong mapping shows
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))


def dump(name, module, x, forward, meta):
    module.eval()
    x = x.clone()
    out = forward(x)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    tensors["input"] = x
    tensors["output"] = out.detach().contiguous()
    tensors["probe"] = probe
    for k, p in module.named_parameters():
        tensors[f"grad.{k}"] = p.grad.detach().contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT / f"{name}.safetensors", metadata={"config": json.dumps(meta)})
    print(name, {k: list(v.shape) for k, v in tensors.items() if not k.startswith("grad.")})


def idefics2():
    vision, d, inter = 24, 32, 48
    cfg = Idefics2Config(
        vision_config={"hidden_size": vision},
        text_config={"model_type": "mistral", "hidden_size": d, "intermediate_size": inter, "rms_norm_eps": 1e-5,
                     "hidden_act": "silu"},
        perceiver_config={"hidden_size": d, "resampler_n_latents": 5, "resampler_depth": 2, "resampler_n_heads": 4,
                          "resampler_head_dim": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                          "hidden_act": "silu"},
    )
    cfg._attn_implementation = "eager"
    cfg.perceiver_config._attn_implementation = "eager"
    m = Idefics2Connector(cfg).float()
    randomize(m)
    x = torch.randn(2, 9, vision)
    mask = torch.ones(2, 9, dtype=torch.long)
    meta = {"vision_hidden": vision, "hidden_size": d, "intermediate_size": inter, "rms_norm_eps": 1e-5,
            "latents": 5, "depth": 2, "heads": 4, "head_dim": 6, "kv_heads": 2, "act": "silu"}
    dump("idefics2", m, x, lambda x: m(x, attention_mask=mask), meta)


def idefics3():
    vision, d = 12, 24
    cfg = Idefics3Config(vision_config={"hidden_size": vision, "num_attention_heads": 2},
                         text_config={"hidden_size": d, "num_attention_heads": 4, "num_key_value_heads": 4},
                         scale_factor=2)
    m = Idefics3Connector(cfg).float()
    randomize(m)
    x = torch.randn(2, 16, vision)
    meta = {"vision_hidden": vision, "hidden_size": d, "scale": 2, "grid": 4}
    dump("idefics3", m, x, m, meta)


class Blip2Connector(torch.nn.Module):
    """The names and computation of Blip2ForConditionalGeneration between vision tower and language model."""

    def __init__(self, qcfg, queries, d_llm):
        super().__init__()
        self.query_tokens = torch.nn.Parameter(torch.zeros(1, queries, qcfg.hidden_size))
        self.qformer = Blip2QFormerModel(qcfg)
        self.language_projection = torch.nn.Linear(qcfg.hidden_size, d_llm)

    def forward(self, image_embeds):
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        q = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(query_embeds=q, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        return self.language_projection(out.last_hidden_state)


def blip2_qformer():
    vision, h, d = 20, 32, 40
    qcfg = Blip2QFormerConfig(hidden_size=h, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                              cross_attention_frequency=2, encoder_hidden_size=vision, layer_norm_eps=1e-12)
    qcfg._attn_implementation = "eager"
    m = Blip2Connector(qcfg, 6, d).float()
    randomize(m)
    x = torch.randn(2, 10, vision)
    meta = {"vision_hidden": vision, "hidden_size": d, "queries": 6, "hidden": h, "layers": 3, "heads": 4,
            "intermediate": 48, "cross_attention_frequency": 2, "layer_norm_eps": 1e-12}
    dump("blip2_qformer", m, x, m, meta)


class InstructBlipConnector(torch.nn.Module):
    """InstructBlipForConditionalGeneration.get_image_features between vision tower and language model."""

    def __init__(self, qcfg, queries, d_llm):
        super().__init__()
        self.query_tokens = torch.nn.Parameter(torch.zeros(1, queries, qcfg.hidden_size))
        self.qformer = InstructBlipQFormerModel(qcfg)
        self.language_projection = torch.nn.Linear(qcfg.hidden_size, d_llm)

    def forward(self, image_embeds, ids, mask):
        q = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        qmask = torch.cat([torch.ones(q.shape[:-1], dtype=torch.long), mask], dim=1)
        out = self.qformer(input_ids=ids, attention_mask=qmask, query_embeds=q, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long))
        return self.language_projection(out.last_hidden_state[:, : q.shape[1], :])


def instructblip_qformer():
    vision, h, d = 20, 32, 40
    qcfg = InstructBlipQFormerConfig(vocab_size=50, hidden_size=h, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, cross_attention_frequency=1, encoder_hidden_size=vision,
                                     max_position_embeddings=16, pad_token_id=0)
    qcfg._attn_implementation = "eager"
    m = InstructBlipConnector(qcfg, 4, d).float()
    randomize(m)
    x = torch.randn(2, 10, vision)
    ids = torch.tensor([[5, 17, 9, 33, 2], [7, 21, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    meta = {"vision_hidden": vision, "hidden_size": d, "queries": 4, "hidden": h, "layers": 2, "heads": 4,
            "intermediate": 48, "cross_attention_frequency": 1, "layer_norm_eps": 1e-12, "vocab_size": 50,
            "max_position_embeddings": 16, "pad_token_id": 0,
            "instructions": [[5, 17, 9, 33, 2], [7, 21, 2]]}
    dump("instructblip_qformer", m, x, lambda x: m(x, ids, mask), meta)


if __name__ == "__main__":
    idefics2()
    idefics3()
    blip2_qformer()
    instructblip_qformer()
