//! Modality encoders. One enum for the spec ([`VisionSpec`]) and one for the module ([`Encoder`]), a variant per
//! family file: CLIP ViT and SigLIP ViT share one pre-LN vision transformer ([`vit::VisionTower`], they differ in
//! class token, pre-layernorm, patch bias and activation, which [`VitSpec`] carries); DINOv2 ([`dinov2::Dinov2`])
//! has its own. The recipe names a family with [`EncoderFamily`], the same enum the zoo maps HF configs onto.
//!
//! Adding an encoder family: a file owning its spec (with `from_hf`/`to_hf`), its module (`init`, `hidden_states`,
//! `forward`), then one variant in `EncoderFamily`, `VisionSpec` and `Encoder` here, its `model_type` in
//! `VisionSpec::from_hf`, and its processor defaults in `VisionSpec::processor_json`.
pub mod blip;
pub mod config;
pub mod dinov2;
pub mod fused;
pub mod qwen2vl;
pub mod vit;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;

use crate::error::{Error, Result};
pub use blip::{BlipSpec, BlipVision};
pub use config::{FeatureSelect, VitFamily, VitSpec};
pub use dinov2::{Dinov2, Dinov2Spec};
pub use fused::{Fused, FusedSpec};
pub use qwen2vl::{Qwen2Vit, Qwen2VitSpec};
pub use vit::VisionTower;

/// Everything needed to build an encoder; derived from config.json or a preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum VisionSpec {
    /// CLIP / SigLIP.
    Vit(VitSpec),
    Dinov2(Dinov2Spec),
    Blip(BlipSpec),
    Fused(FusedSpec),
    Qwen2Vit(Qwen2VitSpec),
}

/// The encoder module: one variant per family (transparent in module paths, see `zoo::path`).
#[derive(Module, Debug)]
pub enum Encoder {
    Vit(VisionTower),
    Dinov2(Dinov2),
    Blip(BlipVision),
    Fused(Fused),
    Qwen2Vit(Qwen2Vit),
}

impl VisionSpec {
    /// The spec a vision config describes, by its `model_type` (CLIP and SigLIP towers, full CLIP models'
    /// `vision_config`, DINOv2 with or without registers).
    pub fn from_hf(v: &Value, path: &Path, prefix: &str) -> Result<Self> {
        match v.get("model_type").and_then(Value::as_str) {
            Some("dinov2" | "dinov2_with_registers") => {
                Ok(VisionSpec::Dinov2(Dinov2Spec::from_hf(v, path, prefix)?))
            }
            Some("blip_2_vision_model" | "instructblip_vision_model") => {
                Ok(VisionSpec::Blip(BlipSpec::from_hf(v, path, prefix)?))
            }
            Some("mitune_fused") => Ok(VisionSpec::Fused(FusedSpec::from_hf(v, path, prefix)?)),
            Some("qwen2_vl" | "qwen2_vl_vision" | "qwen2_5_vl" | "qwen2_5_vl_vision") => Ok(
                VisionSpec::Qwen2Vit(Qwen2VitSpec::from_hf(v, path, prefix)?),
            ),
            _ => Ok(VisionSpec::Vit(VitSpec::from_hf(v, path, prefix)?)),
        }
    }

    pub fn to_hf(&self) -> Value {
        match self {
            VisionSpec::Vit(s) => s.to_hf(),
            VisionSpec::Dinov2(s) => s.to_hf(),
            VisionSpec::Blip(s) => s.to_hf(),
            VisionSpec::Fused(s) => s.to_hf(),
            VisionSpec::Qwen2Vit(s) => s.to_hf(),
        }
    }

    pub fn family(&self) -> EncoderFamily {
        match self {
            VisionSpec::Vit(s) if s.family == VitFamily::Clip => EncoderFamily::ClipVit,
            VisionSpec::Vit(_) => EncoderFamily::SiglipVit,
            VisionSpec::Dinov2(_) => EncoderFamily::Dinov2,
            VisionSpec::Blip(_) => EncoderFamily::BlipVision,
            VisionSpec::Fused(_) => EncoderFamily::Fused,
            VisionSpec::Qwen2Vit(_) => EncoderFamily::Qwen2Vit,
        }
    }

    /// The class a standalone export of this tower is (`config.json` `architectures`).
    pub fn hf_architecture(&self) -> &'static str {
        match self {
            VisionSpec::Vit(s) if s.family == VitFamily::Clip => "CLIPVisionModel",
            VisionSpec::Vit(_) => "SiglipVisionModel",
            VisionSpec::Dinov2(s) => s.hf_architecture(),
            VisionSpec::Blip(s) => s.hf_architecture(),
            VisionSpec::Fused(_) => "MituneFusedVisionModel",
            VisionSpec::Qwen2Vit(s) if s.is_v25() => "Qwen2_5_VisionTransformerPretrainedModel",
            VisionSpec::Qwen2Vit(_) => "Qwen2VisionTransformerPretrainedModel",
        }
    }

    /// The tower's image processor at `size` pixels, as transformers writes it for the family: CLIP (resize the
    /// shortest edge, centre crop, CLIP mean/std), SigLIP (resize to the square, mean/std 0.5), DINOv2
    /// (`BitImageProcessor`: resize + crop, ImageNet mean/std).
    pub fn processor_json(&self, size: usize) -> Value {
        if let VisionSpec::Fused(f) = self {
            // one processor per tower; the loader stacks their outputs on the channel axis
            return fused::processor_json(
                f.towers.iter().map(|t| t.processor_json(size)).collect(),
            );
        }
        match self.family() {
            // BlipImageProcessor: resize to the square (bicubic), CLIP mean/std
            EncoderFamily::BlipVision => json!({
                "image_processor_type": "BlipImageProcessor",
                "do_resize": true, "size": {"height": size, "width": size}, "resample": 3,
                "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }),
            EncoderFamily::ClipVit => json!({
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": true, "size": {"shortest_edge": size}, "resample": 3,
                "do_center_crop": true, "crop_size": {"height": size, "width": size},
                "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }),
            EncoderFamily::SiglipVit => json!({
                "image_processor_type": "SiglipImageProcessor",
                "do_resize": true, "size": {"height": size, "width": size}, "resample": 3,
                "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            }),
            EncoderFamily::Dinov2 => json!({
                "image_processor_type": "BitImageProcessor",
                "do_resize": true, "size": {"shortest_edge": size}, "resample": 3,
                "do_center_crop": true, "crop_size": {"height": size, "width": size},
                "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            }),
            EncoderFamily::Fused => unreachable!("handled above"),
            // Qwen2VLImageProcessor: resize within a pixel budget to a multiple of patch × merge, CLIP mean/std
            EncoderFamily::Qwen2Vit => json!({
                "image_processor_type": "Qwen2VLImageProcessor",
                "do_resize": true, "resample": 3,
                "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                "patch_size": self.patch_size(), "temporal_patch_size": 2, "merge_size": 2,
                "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }),
        }
    }

    /// Feature width per selected layer (a fused encoder's is its towers' sum).
    pub fn hidden_size(&self) -> usize {
        match self {
            VisionSpec::Vit(s) => s.hidden_size,
            VisionSpec::Dinov2(s) => s.hidden_size,
            VisionSpec::Blip(s) => s.hidden_size,
            VisionSpec::Fused(f) => f.towers.iter().map(VisionSpec::hidden_size).sum(),
            VisionSpec::Qwen2Vit(s) => s.embed_dim,
        }
    }
    /// Layers (a fused encoder's: its shallowest tower's, the range a feature layer index must fit).
    pub fn num_layers(&self) -> usize {
        match self {
            VisionSpec::Vit(s) => s.num_layers,
            VisionSpec::Dinov2(s) => s.num_layers,
            VisionSpec::Blip(s) => s.num_layers,
            VisionSpec::Qwen2Vit(s) => s.depth,
            VisionSpec::Fused(f) => f
                .towers
                .iter()
                .map(VisionSpec::num_layers)
                .min()
                .unwrap_or(0),
        }
    }
    /// The first tower of a fused encoder stands for the grid, patch and sizes (validate makes them agree).
    fn lead(&self) -> &VisionSpec {
        match self {
            VisionSpec::Fused(f) if !f.towers.is_empty() => f.towers[0].lead(),
            other => other,
        }
    }
    pub fn patch_size(&self) -> usize {
        match self.lead() {
            VisionSpec::Vit(s) => s.patch_size,
            VisionSpec::Dinov2(s) => s.patch_size,
            VisionSpec::Blip(s) => s.patch_size,
            VisionSpec::Qwen2Vit(s) => s.patch_size,
            VisionSpec::Fused(_) => 0,
        }
    }
    /// Resolution the position embeddings were trained at.
    pub fn image_size(&self) -> usize {
        match self.lead() {
            VisionSpec::Vit(s) => s.image_size,
            VisionSpec::Dinov2(s) => s.image_size,
            VisionSpec::Blip(s) => s.image_size,
            VisionSpec::Qwen2Vit(s) => s.patch_size * s.spatial_merge_size,
            VisionSpec::Fused(_) => 0,
        }
    }
    /// Resolution images are fed at.
    pub fn input_size(&self) -> usize {
        match self.lead() {
            VisionSpec::Vit(s) => s.input_size,
            VisionSpec::Dinov2(s) => s.input_size,
            VisionSpec::Blip(s) => s.input_size,
            VisionSpec::Qwen2Vit(s) => s.patch_size * s.spatial_merge_size,
            VisionSpec::Fused(_) => 0,
        }
    }
    /// Feeds images at `size` pixels (direct scaling); with `retrain`, the position table is made for it too (a
    /// fresh encoder).
    pub fn set_input_size(&mut self, size: usize, retrain: bool) {
        let (input, image) = match self {
            VisionSpec::Vit(s) => (&mut s.input_size, &mut s.image_size),
            VisionSpec::Dinov2(s) => (&mut s.input_size, &mut s.image_size),
            VisionSpec::Blip(s) => (&mut s.input_size, &mut s.image_size),
            VisionSpec::Fused(f) => {
                for t in &mut f.towers {
                    t.set_input_size(size, retrain);
                }
                return;
            }
            // native resolution: every image keeps its own size (min/max pixels bound it)
            VisionSpec::Qwen2Vit(_) => return,
        };
        *input = size;
        if retrain {
            *image = size;
        }
    }
    /// Overrides a fresh (preset) encoder's architecture fields (a fused encoder's towers are set one by one).
    pub fn set_arch(
        &mut self,
        hidden: Option<usize>,
        intermediate: Option<usize>,
        layers: Option<usize>,
        heads: Option<usize>,
        patch: Option<usize>,
    ) {
        let slots = match self {
            VisionSpec::Vit(s) => [
                &mut s.hidden_size,
                &mut s.intermediate_size,
                &mut s.num_layers,
                &mut s.num_heads,
                &mut s.patch_size,
            ],
            VisionSpec::Dinov2(s) => [
                &mut s.hidden_size,
                &mut s.intermediate_size,
                &mut s.num_layers,
                &mut s.num_heads,
                &mut s.patch_size,
            ],
            VisionSpec::Blip(s) => [
                &mut s.hidden_size,
                &mut s.intermediate_size,
                &mut s.num_layers,
                &mut s.num_heads,
                &mut s.patch_size,
            ],
            VisionSpec::Qwen2Vit(s) => [
                &mut s.embed_dim,
                &mut s.out_hidden_size,
                &mut s.depth,
                &mut s.num_heads,
                &mut s.patch_size,
            ],
            VisionSpec::Fused(_) => return,
        };
        for (v, slot) in [hidden, intermediate, layers, heads, patch]
            .into_iter()
            .zip(slots)
        {
            if let Some(v) = v {
                *slot = v;
            }
        }
    }
    /// Patches per side at the input resolution.
    pub fn grid(&self) -> usize {
        self.input_size() / self.patch_size().max(1)
    }
    /// Tokens before the patches (CLS, registers; a fused encoder drops each tower's own).
    pub fn prefix_tokens(&self) -> usize {
        match self {
            VisionSpec::Vit(s) => usize::from(s.has_cls()),
            VisionSpec::Dinov2(s) => 1 + s.registers,
            VisionSpec::Blip(_) => 1,
            VisionSpec::Fused(_) | VisionSpec::Qwen2Vit(_) => 0,
        }
    }
    /// Tokens the tower outputs per image.
    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid() + self.prefix_tokens()
    }

    /// Checks that cannot wait for the first image.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let VisionSpec::Fused(f) = self {
            return f.validate();
        }
        if let VisionSpec::Qwen2Vit(s) = self {
            return s.validate();
        }
        if self.num_layers() == 0 || self.patch_size() == 0 || self.hidden_size() == 0 {
            return Err("encoder: layers, patch size and width must be positive".into());
        }
        if self.input_size() % self.patch_size() != 0 {
            return Err(format!(
                "encoder: input size {} is not a multiple of the patch size {}",
                self.input_size(),
                self.patch_size()
            ));
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> Encoder {
        match self {
            VisionSpec::Vit(s) => Encoder::Vit(s.init(device)),
            VisionSpec::Dinov2(s) => Encoder::Dinov2(s.init(device)),
            VisionSpec::Blip(s) => Encoder::Blip(s.init(device)),
            VisionSpec::Fused(f) => Encoder::Fused(Fused {
                towers: f.towers.iter().map(|t| t.init(device)).collect(),
                grid: self.grid(),
            }),
            VisionSpec::Qwen2Vit(s) => Encoder::Qwen2Vit(s.init(device)),
        }
    }
}

impl Encoder {
    /// hidden_states[0..=last] of pixels [n, c, s, s]: the embedding output, then each layer's output.
    pub fn hidden_states(&self, pixels: Tensor<4>, last: usize) -> Vec<Tensor<3>> {
        match self {
            Encoder::Vit(m) => m.hidden_states(pixels, last),
            Encoder::Dinov2(m) => m.hidden_states(pixels, last),
            Encoder::Blip(m) => m.hidden_states(pixels, last),
            Encoder::Fused(m) => m.hidden_states(pixels, last),
            // needs each image's patch grid: `Qwen2Vit::forward` (Llava reads it with the sizes)
            Encoder::Qwen2Vit(_) => vec![],
        }
    }

    /// Image features as LLaVA selects them: pixels [n, c, s, s] -> [n, tokens, d · layers.len()]; the patch
    /// selection drops the tokens before the patches (CLS, registers; transformers' `default` drops one token
    /// whatever the tower, which SigLIP keeps).
    pub fn features(
        &self,
        pixels: Tensor<4>,
        select: &FeatureSelect,
        spec: &VisionSpec,
    ) -> Result<Tensor<3>> {
        if let (Encoder::Fused(m), VisionSpec::Fused(s)) = (self, spec) {
            return m.features(pixels, select, s);
        }
        if let Encoder::Qwen2Vit(_) = self {
            return Err(Error::input(
                "a Qwen2-VL vision tower reads each image's patch grid: its features come from Llava::input_embeds",
            ));
        }
        let idx = select.indices(spec.num_layers()).map_err(Error::input)?;
        let last = idx.iter().copied().max().unwrap_or(0);
        let states = self.hidden_states(pixels, last);
        let drop = select.dropped(spec);
        let picked: Vec<Tensor<3>> = idx
            .iter()
            .map(|&i| {
                let s = states[i].clone();
                // BLIP-2/InstructBLIP read the last layer after the tower's final norm
                let s = if select.post_norm && i == spec.num_layers() {
                    self.final_norm(s)
                } else {
                    s
                };
                let [n, t, d] = s.dims();
                s.slice([0..n, drop..t, 0..d])
            })
            .collect();
        Ok(Tensor::cat(picked, 2))
    }

    /// The tower's final norm (CLIP/SigLIP/BLIP `post_layernorm`, DINOv2 `layernorm`) on hidden states [n, t, d].
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Encoder::Vit(m) => m.post_layernorm.forward(x),
            Encoder::Dinov2(m) => m.layernorm.forward(x),
            Encoder::Blip(m) => m.post_layernorm.forward(x),
            Encoder::Fused(_) | Encoder::Qwen2Vit(_) => x,
        }
    }

    /// The tower's own output (all layers + final norm): [n, tokens, d].
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        match self {
            Encoder::Vit(m) => m.forward(pixels),
            Encoder::Dinov2(m) => m.forward(pixels),
            Encoder::Blip(m) => m.forward(pixels),
            Encoder::Fused(m) => m.forward(pixels),
            // the tower's own output for one image whose patches form a square grid (any other grid needs
            // `Qwen2Vit::forward` with the grids; a patch count that is no square gives no tokens)
            Encoder::Qwen2Vit(m) => {
                let (n, device) = (pixels.dims()[0], pixels.device());
                let side = (n as f64).sqrt() as usize;
                m.forward(pixels, &[[1, side, side]])
                    .map(|x| x.unsqueeze::<3>())
                    .unwrap_or_else(|_| Tensor::zeros([1, 0, m.spec.embed_dim], &device))
            }
        }
    }
}

/// An encoder family as recipes name it (`[model.encoder] kind = "clip_vit"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderFamily {
    ClipVit,
    SiglipVit,
    Dinov2,
    /// BLIP-2 / InstructBLIP's vision tower (`Blip2VisionModel`, `InstructBlipVisionModel`).
    BlipVision,
    /// Several towers on the same image, features concatenated per patch (`towers = [...]`).
    Fused,
    /// Qwen2-VL's native-resolution ViT (`Qwen2VisionTransformerPretrainedModel`).
    Qwen2Vit,
}
