//! Modality encoders. CLIP ViT and SigLIP ViT share one pre-LN vision transformer ([`vit::VisionTower`]); they
//! differ in class token, pre-layernorm, patch bias and activation, which [`VitSpec`] carries.
pub mod config;
pub mod vit;

pub use config::{FeatureSelect, VitFamily, VitSpec};
pub use vit::VisionTower;
