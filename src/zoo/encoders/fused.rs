//! A fused encoder (Prismatic's "dinosiglip", Karamcheti et al. 2024; CogAgent's two towers): several towers see
//! the same image, each through its own preprocessing, and their selected patch features are concatenated per
//! patch — DINOv2's spatial detail next to SigLIP's semantics. The towers must agree on the patch grid (so the
//! features line up patch by patch) and, in mitune, on the input resolution: the image processor stacks each
//! tower's pixels on the channel axis ([n, 3·towers, s, s]) and tower i reads channels 3i..3i+3. Each tower drops
//! its own prefix tokens (CLS, registers) under `select = "patch"`; the feature layer index applies to each tower.
//! Saved in mitune's layout (`vision_config.model_type = "mitune_fused"`, tensors under `vision_tower.towers.{i}.`);
//! transformers has no such LLaVA.
use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;

use super::{Encoder, FeatureSelect, VisionSpec};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusedSpec {
    pub towers: Vec<VisionSpec>,
}

#[derive(Module, Debug)]
pub struct Fused {
    pub towers: Vec<Encoder>,
    /// Patches per side, shared by every tower.
    #[module(skip)]
    pub grid: usize,
}

/// The image processor of a fused encoder: one per tower, their outputs stacked on the channel axis by
/// `data::images::ImageProcessor` (`MituneFusedImageProcessor`).
pub fn processor_json(towers: Vec<Value>) -> Value {
    json!({ "image_processor_type": "MituneFusedImageProcessor", "towers": towers })
}

impl FusedSpec {
    pub fn from_hf(v: &Value, path: &Path, prefix: &str) -> Result<Self> {
        let towers = v.get("towers").and_then(Value::as_array).ok_or_else(|| {
            Error::key(
                path,
                format!("{prefix}towers"),
                "missing: a list of tower configs",
            )
        })?;
        let towers = towers
            .iter()
            .enumerate()
            .map(|(i, t)| VisionSpec::from_hf(t, path, &format!("{prefix}towers.{i}.")))
            .collect::<Result<Vec<_>>>()?;
        Ok(FusedSpec { towers })
    }

    pub fn to_hf(&self) -> Value {
        json!({
            "model_type": "mitune_fused",
            "towers": self.towers.iter().map(VisionSpec::to_hf).collect::<Vec<_>>(),
        })
    }

    /// Towers agree on grid and resolution; none is itself fused.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let Some(first) = self.towers.first() else {
            return Err("encoder fused: give at least one tower".into());
        };
        for (i, t) in self.towers.iter().enumerate() {
            if matches!(t, VisionSpec::Fused(_)) {
                return Err(format!("encoder fused: tower {i} is itself fused"));
            }
            t.validate().map_err(|m| format!("tower {i}: {m}"))?;
            if t.grid() != first.grid() {
                return Err(format!(
                    "encoder fused: the towers disagree on the patch grid — tower 0 gives {g0}×{g0} patches \
                     ({s0} px / {p0} px patches), tower {i} {g}×{g} ({s} px / {p} px); set `image_size` so both \
                     grids match",
                    g0 = first.grid(),
                    s0 = first.input_size(),
                    p0 = first.patch_size(),
                    g = t.grid(),
                    s = t.input_size(),
                    p = t.patch_size(),
                ));
            }
            if t.input_size() != first.input_size() {
                return Err(format!(
                    "encoder fused: tower {i} is fed {} px and tower 0 {} px; mitune feeds the towers one \
                     resolution (their pixels share one tensor): use towers with equal patch sizes",
                    t.input_size(),
                    first.input_size()
                ));
            }
        }
        Ok(())
    }
}

impl Fused {
    /// Tower i's channels of the stacked pixels: [n, 3, s, s].
    fn pixels_of(pixels: &Tensor<4>, i: usize) -> Tensor<4> {
        let [n, _, h, w] = pixels.dims();
        pixels.clone().slice([0..n, 3 * i..3 * i + 3, 0..h, 0..w])
    }

    /// Each tower's tokens without its prefix (the last grid² tokens), concatenated per patch.
    fn cat_patches(states: Vec<Tensor<3>>, grid: usize) -> Tensor<3> {
        let parts = states
            .into_iter()
            .map(|s| {
                let [n, t, d] = s.dims();
                s.slice([0..n, t - grid * grid..t, 0..d])
            })
            .collect();
        Tensor::cat(parts, 2)
    }

    /// hidden_states[0..=last], each the towers' patch tokens side by side: [n, grid², Σ d_i].
    pub fn hidden_states(&self, pixels: Tensor<4>, last: usize) -> Vec<Tensor<3>> {
        let per: Vec<Vec<Tensor<3>>> = self
            .towers
            .iter()
            .enumerate()
            .map(|(i, t)| t.hidden_states(Self::pixels_of(&pixels, i), last))
            .collect();
        (0..=last)
            .map(|k| Self::cat_patches(per.iter().map(|s| s[k].clone()).collect(), self.grid))
            .collect()
    }

    /// Each tower's own output (final norm included), patch tokens side by side: [n, grid², Σ d_i].
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        let outs = self
            .towers
            .iter()
            .enumerate()
            .map(|(i, t)| t.forward(Self::pixels_of(&pixels, i)))
            .collect();
        Self::cat_patches(outs, self.grid)
    }

    /// pixels [n, 3·towers, s, s] -> per-patch concatenation of each tower's selected features:
    /// [n, grid², Σ d_i · layers]. Each tower selects as a single encoder does (its own depth for negative layer
    /// indices, its own final norm), dropping exactly its own prefix tokens: SigLIP, without CLS, keeps all.
    pub fn features(
        &self,
        pixels: Tensor<4>,
        select: &FeatureSelect,
        spec: &FusedSpec,
    ) -> Result<Tensor<3>> {
        let mut parts = vec![];
        for (i, (tower, ts)) in self.towers.iter().zip(&spec.towers).enumerate() {
            let own = FeatureSelect {
                drop_cls: select.drop_cls && ts.prefix_tokens() > 0,
                ..select.clone()
            };
            parts.push(tower.features(Self::pixels_of(&pixels, i), &own, ts)?);
        }
        Ok(Tensor::cat(parts, 2))
    }
}
