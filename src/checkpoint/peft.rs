//! LoRA adapters in PEFT's layout, so `PeftModel.from_pretrained(llava, DIR)` loads what mitune trained:
//! `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, modules_to_save, base_model_name_or_path)
//! and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
//! [out, r] (module names in transformers 5's layout), plus the fully trained modules (`modules_to_save`) under
//! `base_model.model.<key>`. burn keeps the factors transposed (A [in, r], B [r, out]).
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::params::{Collector, Loader, transpose2};
use super::safetensors_io::{ToWrite, WeightStore, write_file};
use crate::error::{Error, Result, read_json};
use crate::recipe::schema::Adapter;
use crate::zoo::lora::{self, Linear, hf5_key};
use crate::zoo::mllm::Llava;

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The fields of PEFT's `LoraConfig` mitune writes and reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// A regex matched in full (as mitune writes it) or a list of module-name suffixes.
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub task_type: Option<String>,
}

/// PEFT's module name for a fully trained part (`modules_to_save` matches by name suffix); `qwen`: Qwen2-VL's
/// names (`model.visual`, its `merger`).
fn saved_modules(part: &str, qwen: bool) -> &'static [&'static str] {
    match (part, qwen) {
        ("connector", false) => &["multi_modal_projector"],
        ("connector", true) => &["merger"],
        ("encoder", false) => &["vision_tower"],
        ("encoder", true) => &["visual"],
        _ => &["language_model", "lm_head"],
    }
}

fn key_prefixes(part: &str, qwen: bool) -> &'static [&'static str] {
    match (part, qwen) {
        ("connector", false) => &["model.multi_modal_projector."],
        ("connector", true) => &["model.visual.merger."],
        ("encoder", false) => &["model.vision_tower."],
        // the whole `visual` module holds the merger too: a trained encoder saves its tower's tensors
        ("encoder", true) => &["model.visual.blocks.", "model.visual.patch_embed."],
        _ => &["model.language_model.", "lm_head."],
    }
}

/// Writes the adapters on `targets` (and the parts in `to_save`, trained in full) into `out`, naming `base` as the
/// model they apply to.
pub fn save(
    model: &Llava,
    f: &Adapter,
    targets: &[Linear],
    to_save: &[String],
    base: &Path,
    out: &Path,
) -> Result<()> {
    // data parallel: rank 0 alone writes (every rank holds the same adapter)
    if !crate::dist::writer() {
        return Ok(());
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let qwen = super::qwen2vl::is_qwen2vl(&model.spec);
    let values = lora::factors(model);
    let mut tensors = vec![];
    for t in targets {
        for (factor, name) in [("a", "lora_A"), ("b", "lora_B")] {
            let path = format!("{}.lora.{factor}", t.param);
            let (dims, v) = values.get(&path).ok_or_else(|| {
                Error::input(format!("the model has no adapter on {} to save", t.module))
            })?;
            tensors.push(ToWrite::f32(
                format!("{PREFIX}{}.{name}.weight", t.module),
                vec![dims[1], dims[0]],
                &transpose2(v, dims[0], dims[1]),
                safetensors::Dtype::F32,
            ));
        }
    }
    let keys: &dyn Fn(&str) -> Vec<String> = &|p| vec![hf5_key(p)];
    for w in Collector::collect(model, keys, safetensors::Dtype::F32) {
        if to_save
            .iter()
            .any(|p| key_prefixes(p, qwen).iter().any(|k| w.name.starts_with(k)))
        {
            tensors.push(ToWrite {
                name: format!("{PREFIX}{}", w.name),
                ..w
            });
        }
    }
    write_file(&out.join(WEIGHTS), &tensors)?;
    static ONCE: std::sync::Once = std::sync::Once::new();
    if model.image_newline.is_some() && to_save.iter().any(|p| p == "connector") {
        ONCE.call_once(|| eprintln!(
            "warning: {}: PEFT carries the trained projector (modules_to_save) but not LLaVA-NeXT's image_newline, a \
             bare parameter it has no slot for; the merged model directory holds the exact trained model",
            out.display()
        ));
    }
    let modules: Vec<String> = targets.iter().map(|t| regex::escape(&t.module)).collect();
    let to_save: Vec<String> = to_save
        .iter()
        .flat_map(|p| saved_modules(p, qwen).iter().map(|s| s.to_string()))
        .collect();
    let cfg = PeftConfig {
        peft_type: "LORA".into(),
        base_model_name_or_path: Some(
            std::path::absolute(base)
                .unwrap_or_else(|_| base.to_path_buf())
                .display()
                .to_string(),
        ),
        r: f.rank,
        lora_alpha: f.alpha,
        lora_dropout: f.dropout,
        target_modules: format!("(?:{})", modules.join("|")).into(),
        modules_to_save: (!to_save.is_empty()).then_some(to_save),
        bias: Some("none".into()),
        fan_in_fan_out: false,
        use_rslora: false,
        use_dora: false,
        inference_mode: true,
        init_lora_weights: true.into(),
        task_type: None,
    };
    let p = out.join(CONFIG);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap())
        .map_err(|source| Error::Io { path: p, source })
}

pub fn read_config(dir: &Path) -> Result<PeftConfig> {
    let p = dir.join(CONFIG);
    let cfg: PeftConfig = read_json(&p)?;
    if cfg.peft_type != "LORA" {
        return Err(Error::key(
            &p,
            "peft_type",
            format!("{:?}: only LORA adapters load", cfg.peft_type),
        ));
    }
    for (k, on) in [
        ("use_dora", cfg.use_dora),
        ("use_rslora", cfg.use_rslora),
        ("fan_in_fan_out", cfg.fan_in_fan_out),
    ] {
        if on {
            return Err(Error::key(&p, k, "true is not supported (plain LoRA only)"));
        }
    }
    Ok(cfg)
}

/// The recipe-style targets a saved config names (its regex, or its list of names).
pub fn config_targets(cfg: &PeftConfig, dir: &Path) -> Result<Vec<String>> {
    match &cfg.target_modules {
        serde_json::Value::String(s) => Ok(vec![format!("re:{s}")]),
        serde_json::Value::Array(a) => Ok(a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()),
        _ => Err(Error::key(
            dir.join(CONFIG),
            "target_modules",
            "expected a regex string or a list of module names",
        )),
    }
}

/// Fills the adapters already attached to `targets` (and the saved modules) from `dir`. A file whose modules or
/// ranks differ from the model's adapters is an error naming the tensor: the adapter was made for another base or
/// another adapter configuration.
pub fn load(model: Llava, dir: &Path, targets: &[Linear], device: &Device) -> Result<Llava> {
    let cfg = read_config(dir)?;
    let file = dir.join(WEIGHTS);
    let store = WeightStore::open_files(&[file.clone()])?;
    let mut used: HashSet<String> = HashSet::new();
    struct Fill<'a> {
        store: &'a WeightStore,
        targets: &'a [Linear],
        stack: crate::zoo::path::PathStack,
        used: &'a mut HashSet<String>,
        errors: Vec<Error>,
        device: Device,
        file: PathBuf,
    }
    impl ModuleMapper for Fill<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.stack.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.stack.path();
            let Some((weight, factor)) = path.rsplit_once(".lora.") else {
                return param;
            };
            let Some(t) = self.targets.iter().find(|t| t.param == weight) else {
                return param;
            };
            let name = if factor == "a" { "lora_A" } else { "lora_B" };
            let key = format!("{PREFIX}{}.{name}.weight", t.module);
            let loaded = match self.store.get(&key) {
                Ok(l) => l,
                Err(_) => {
                    self.errors.push(Error::key(
                        &self.file,
                        &key,
                        "missing: the adapter does not cover this target (made for other target modules?)",
                    ));
                    return param;
                }
            };
            self.used.insert(key.clone());
            let dims = param.val().dims().to_vec();
            if loaded.shape != [dims[1], dims[0]] {
                self.errors.push(Error::key(
                    &self.file,
                    &key,
                    format!(
                        "shape {:?}, the model's adapter needs {:?}: another rank or another base model",
                        loaded.shape,
                        [dims[1], dims[0]]
                    ),
                ));
                return param;
            }
            let values = transpose2(&loaded.values, dims[1], dims[0]);
            let device = self.device.clone();
            param.map(move |old| {
                let rg = old.is_require_grad();
                let t: Tensor<D> = Tensor::from_data(TensorData::new(values, dims), &device);
                if rg { t.require_grad() } else { t }
            })
        }
    }
    let mut fill = Fill {
        store: &store,
        targets,
        stack: Default::default(),
        used: &mut used,
        errors: vec![],
        device: device.clone(),
        file: file.clone(),
    };
    let mut model = model.map(&mut fill);
    if let Some(e) = fill.errors.into_iter().next() {
        return Err(e);
    }
    // Fully trained modules saved beside the adapters (PEFT's modules_to_save).
    model.multi_modal_projector = load_saved(
        &store,
        model.multi_modal_projector,
        "multi_modal_projector.",
        device,
    )?;
    model.vision_tower = load_saved(&store, model.vision_tower, "vision_tower.", device)?;
    model.language_model = load_saved(&store, model.language_model, "language_model.", device)?;
    let unknown: Vec<&str> = store
        .keys()
        .filter(|k| (k.contains(".lora_A.") || k.contains(".lora_B.")) && !used.contains(*k))
        .collect();
    if let Some(k) = unknown.first() {
        return Err(Error::key(
            &file,
            *k,
            format!(
                "an adapter on a module the model's targets do not select ({} such tensors; r = {} in {})",
                unknown.len(),
                cfg.r,
                CONFIG
            ),
        ));
    }
    Ok(model)
}

/// Fills `module` (the LLaVA's part under burn path `prefix`) from the adapter file's fully trained copy of it,
/// when the file has one.
fn load_saved<M: Module>(
    store: &WeightStore,
    module: M,
    prefix: &str,
    device: &Device,
) -> Result<M> {
    let key = |p: &str| format!("{PREFIX}{}", hf5_key(&format!("{prefix}{p}")));
    // the part's HF key prefix, as a probe key without the parameter name shows it
    let head = key("").trim_end_matches('.').to_string();
    if !store
        .keys()
        .any(|k| k.starts_with(&head) && !k.contains(".lora_A.") && !k.contains(".lora_B."))
    {
        return Ok(module);
    }
    let keys = |p: &str| vec![key(p)];
    Loader::new(store, &keys, &[], device).load_part(module)
}

/// A base LLaVA directory plus a PEFT adapter directory → the adapted model (adapters attached, not merged).
pub fn load_adapted(base: &Path, adapter: &Path, device: &Device) -> Result<Llava> {
    let cfg = read_config(adapter)?;
    let targets = config_targets(&cfg, adapter)?;
    let parts: Vec<String> = ["encoder", "connector", "llm"].map(String::from).to_vec();
    let f = Adapter {
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        targets,
        parts,
        ..Adapter::lora(0, 0.0, &[], &[])
    };
    let model = super::load_llava(base, device)?;
    let key = adapter.join(CONFIG).display().to_string();
    let linears = lora::resolve(&model, &f, &key)?;
    let model = lora::attach(model, &f, &linears, device)?;
    load(model, adapter, &linears, device)
}
