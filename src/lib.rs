//! mitune: staged training of multimodal LLMs (encoder + connector + LLM) over burn.
//! See README.md for the commands and shared/STYLE.md for the architecture.
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod generate;
pub mod recipe;
pub mod report;
pub mod stages;
pub mod zoo;

pub use error::{Error, Result};

/// The compute device: flex (CPU) by default; `MITUNE_DEVICE=wgpu|vulkan` picks a GPU backend when built in.
pub fn default_device() -> burn::tensor::Device {
    match std::env::var("MITUNE_DEVICE").as_deref() {
        #[cfg(feature = "wgpu")]
        Ok("wgpu") => burn::tensor::Device::wgpu(Default::default()),
        #[cfg(feature = "vulkan")]
        Ok("vulkan") => burn::tensor::Device::vulkan(Default::default()),
        _ => burn::tensor::Device::flex(),
    }
}
