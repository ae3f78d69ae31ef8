//! Explicit key tables between mitune's module paths and HuggingFace checkpoint names, in one place: the zoo's
//! names for its modules, read by checkpoint I/O (`checkpoint::hf`) and the adapters' PEFT names (`zoo::lora`).
//! Module fields carry HF names, so most paths map by prefix; norms' `gamma`/`beta` become `weight`/`bias`
//! (done by the loader) and the projector's `layers.{i}` become `linear_{i+1}`. The first candidate is the name
//! mitune writes; the others are accepted on read (transformers 4.x hub layout and 5.x native layout).

/// Keys of a `LlavaForConditionalGeneration` checkpoint.
pub fn llava(path: &str) -> Vec<String> {
    // Qwen2-VL's tower (`blocks`, `patch_embed`) and patch merger (`ln_q`, `fc1`, `fc2`) have module paths no other
    // family uses: their names are Qwen2-VL's wherever a key is asked for (PEFT names, LoRA targets)
    if path.starts_with("vision_tower.blocks.")
        || path.starts_with("vision_tower.patch_embed.")
        || ["ln_q.", "fc1.", "fc2."]
            .iter()
            .any(|p| path.starts_with(&format!("multi_modal_projector.{p}")))
    {
        return qwen2vl(path);
    }
    if path.starts_with("vision_tower.towers.") {
        // a fused encoder's towers: mitune's own layout, by module path
        vec![path.to_string(), format!("model.{path}")]
    } else if let Some(names) = path
        .strip_prefix("vision_tower.")
        .and_then(crate::zoo::encoders::dinov2::hf_keys)
    {
        let mut out: Vec<String> = names.iter().map(|n| format!("vision_tower.{n}")).collect();
        out.extend(names.iter().map(|n| format!("model.vision_tower.{n}")));
        out
    } else if let Some(rest) = path.strip_prefix("vision_tower.") {
        vec![
            format!("vision_tower.vision_model.{rest}"),
            format!("vision_tower.{rest}"),
            format!("model.vision_tower.vision_model.{rest}"),
            format!("model.vision_tower.{rest}"),
        ]
    } else if let Some(rest) = path.strip_prefix("multi_modal_projector.") {
        let k = projector(rest);
        vec![
            format!("multi_modal_projector.{k}"),
            format!("model.multi_modal_projector.{k}"),
        ]
    } else if let Some(rest) = path.strip_prefix("language_model.") {
        if rest.starts_with("lm_head.") {
            vec![format!("language_model.{rest}"), rest.to_string()]
        } else {
            vec![
                format!("language_model.model.{rest}"),
                format!("model.language_model.{rest}"),
            ]
        }
    } else if path == "image_newline" {
        vec![path.to_string(), format!("model.{path}")]
    } else {
        vec![path.to_string()]
    }
}

/// `layers.{i}.weight` -> `linear_{i+1}.weight`
pub fn projector(rest: &str) -> String {
    match rest.strip_prefix("layers.").and_then(|r| r.split_once('.')) {
        Some((i, tail)) => format!("linear_{}.{tail}", i.parse::<usize>().map_or(0, |i| i + 1)),
        None => rest.to_string(),
    }
}

/// Keys of a standalone `CLIPVisionModel` / `SiglipVisionModel` (a full `CLIPModel` too: its text tower is ignored).
pub fn vision(path: &str) -> Vec<String> {
    if let Some(names) = crate::zoo::encoders::dinov2::hf_keys(path) {
        return names;
    }
    vec![format!("vision_model.{path}"), path.to_string()]
}

/// Keys of a standalone `LlamaForCausalLM` / `Qwen2ForCausalLM`.
pub fn llm(path: &str) -> Vec<String> {
    if path.starts_with("lm_head.") {
        vec![path.to_string()]
    } else {
        vec![format!("model.{path}"), path.to_string()]
    }
}

/// Stored tensors that are known and deliberately not used (buffers, heads LLaVA does not need, the text tower of a
/// full CLIP checkpoint). Anything else left over is an "unexpected tensor" error.
pub fn ignorable(key: &str) -> bool {
    const PARTS: [&str; 10] = [
        "vision_tower.head.",
        "position_ids",
        "rotary_emb.inv_freq",
        "text_model.",
        "logit_scale",
        "logit_bias",
        "visual_projection.",
        "text_projection.",
        "vision_model.head.",
        "mask_token",
    ];
    PARTS.iter().any(|p| key.contains(p)) || key.starts_with("head.")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn llava_names() {
        assert_eq!(
            llava("multi_modal_projector.layers.1.bias")[0],
            "multi_modal_projector.linear_2.bias"
        );
        assert_eq!(
            llava("language_model.lm_head.weight")[0],
            "language_model.lm_head.weight"
        );
        assert_eq!(
            llava("language_model.norm.weight")[1],
            "model.language_model.norm.weight"
        );
        assert_eq!(
            llava("vision_tower.post_layernorm.bias")[1],
            "vision_tower.post_layernorm.bias"
        );
    }
}

/// Keys of a Qwen2-VL checkpoint for a mitune module path (the first is what mitune writes).
pub fn qwen2vl(path: &str) -> Vec<String> {
    if let Some(rest) = path.strip_prefix("vision_tower.") {
        vec![format!("visual.{rest}"), format!("model.visual.{rest}")]
    } else if let Some(rest) = path.strip_prefix("multi_modal_projector.") {
        let rest = if let Some(r) = rest.strip_prefix("fc1.") {
            format!("mlp.0.{r}")
        } else if let Some(r) = rest.strip_prefix("fc2.") {
            format!("mlp.2.{r}")
        } else {
            rest.to_string()
        };
        vec![
            format!("visual.merger.{rest}"),
            format!("model.visual.merger.{rest}"),
        ]
    } else if let Some(rest) = path.strip_prefix("language_model.") {
        if rest.starts_with("lm_head.") {
            vec![rest.to_string()]
        } else {
            vec![
                format!("model.{rest}"),
                format!("model.language_model.{rest}"),
            ]
        }
    } else {
        vec![path.to_string()]
    }
}
