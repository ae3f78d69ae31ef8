//! `mitune inspect DIR`: what a checkpoint holds, before anyone trains on it.
use burn::module::Module;
use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::hf::llava_spec;
use crate::checkpoint::load_llava;
use crate::checkpoint::safetensors_io::WeightStore;
use crate::error::Result;

pub fn run(dir: &Path) -> Result<()> {
    let spec = llava_spec(dir)?;
    let store = WeightStore::open_dir(dir)?;
    let device = burn::tensor::Device::flex();
    let model = load_llava(dir, &device)?;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for k in store.keys() {
        *dtypes
            .entry(format!("{:?}", store.dtype(k).unwrap()))
            .or_default() += 1;
    }
    let v = &spec.vision;
    let l = &spec.llm;
    let (vp, cp, lp) = (
        model.vision_tower.num_params(),
        model.multi_modal_projector.num_params(),
        model.language_model.num_params(),
    );
    // the class transformers loads: the one config.json names (mitune writes it for every layout)
    let arch = crate::checkpoint::hf::config_of(dir)
        .ok()
        .and_then(|(_, c)| c["architectures"][0].as_str().map(str::to_string))
        .unwrap_or_else(|| "LlavaForConditionalGeneration".into());
    println!("{}  ({arch})", dir.display());
    println!(
        "├─ vision_tower          {:?} ({})  {:>12} params",
        v.family(),
        v.hf_architecture(),
        vp
    );
    match &spec.native {
        Some(n) => println!(
            "│    {} layers, d={}, patch={}, native resolution: {}..{} pixels per image, sides multiples of {} px",
            v.num_layers(),
            v.hidden_size(),
            v.patch_size(),
            n.min_pixels,
            n.max_pixels,
            n.factor()
        ),
        None => println!(
            "│    {} layers, d={}, patch={}, image={}px, {} tokens per image",
            v.num_layers(),
            v.hidden_size(),
            v.patch_size(),
            v.input_size(),
            v.num_tokens()
        ),
    }
    println!(
        "│    features: layers {:?}, {}{}",
        spec.select.layers,
        if spec.select.drop_cls {
            "patch tokens (prefix dropped)"
        } else {
            "full"
        },
        if spec.select.post_norm {
            ", after the final norm"
        } else {
            ""
        }
    );
    let f = spec.features();
    println!(
        "├─ multi_modal_projector {}  {:>12} params",
        spec.connector.kind(),
        cp
    );
    println!(
        "│    {:?}\n│    {} tokens × {} in -> {} image tokens × {}",
        spec.connector,
        f.tokens,
        f.width,
        spec.image_tokens(),
        l.hidden_size
    );
    println!("└─ language_model        {:?}  {:>12} params", l.family, lp);
    println!(
        "     {} layers, d={}, heads={}/{} kv, head_dim={}, ffn={}, rope θ={} {:?}, tied={}",
        l.num_layers,
        l.hidden_size,
        l.num_heads,
        l.num_kv_heads,
        l.head_dim,
        l.intermediate_size,
        l.rope.theta,
        l.rope.scaling,
        l.tie_word_embeddings
    );
    println!("total params: {}", vp + cp + lp);
    println!(
        "stored dtypes: {dtypes:?} ({} tensors)",
        store.keys().count()
    );
    if let Some(n) = &spec.native {
        println!(
            "image tokens per image: by size (native resolution: one per {f}×{f} pixels after resizing into {}..{} \
             pixels), M-RoPE sections {:?}  (image token id {})",
            n.min_pixels,
            n.max_pixels,
            spec.llm.rope.mrope_section.clone().unwrap_or_default(),
            spec.image_token_id,
            f = n.factor()
        );
        println!("vocab size: {}", l.vocab_size);
        return Ok(());
    }
    match &spec.anyres {
        None => println!(
            "image tokens per image: {}  (image token id {})",
            spec.image_tokens(),
            spec.image_token_id
        ),
        Some(x) => println!(
            "image tokens per image: by size (AnyRes, {} px tiles, pinpoints {:?}): {} + rows × (cols + 1)  (image token id {})",
            x.tile,
            x.pinpoints,
            spec.image_tokens(),
            spec.image_token_id
        ),
    }
    println!("vocab size: {}", l.vocab_size);
    Ok(())
}
