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

/// Seeds `device`'s random stream and the CPU's, where fresh weights are drawn (`init_portable`).
pub fn seed(device: &burn::tensor::Device, seed: u64) {
    device.seed(seed);
    burn::tensor::Device::flex().seed(seed);
}

/// A fresh module drawn on the CPU (flex) and moved to `device`. Each backend has its own random stream, so drawn
/// on a GPU backend a seed would give other initial weights than on the CPU; drawn here, a seed gives the same
/// model on every backend, and runs on different devices can be compared step by step. burn initialises
/// parameters lazily, at their first use, on the device they are on by then: every parameter is drawn here, in
/// the module's order, before the move (so the draws' order does not depend on what touches them first either).
pub fn init_portable<M: burn::module::Module>(
    device: &burn::tensor::Device,
    init: impl FnOnce(&burn::tensor::Device) -> M,
) -> M {
    struct Draw;
    impl burn::module::ModuleVisitor for Draw {
        fn visit_float<const D: usize>(
            &mut self,
            p: &burn::module::Param<burn::tensor::Tensor<D>>,
        ) {
            let _ = p.val();
        }
    }
    let cpu = match device.is_autodiff() {
        true => burn::tensor::Device::flex().autodiff(),
        false => burn::tensor::Device::flex(),
    };
    /// Each parameter's values copied onto `device` as a new leaf (`Module::to_device` under autodiff leaves a
    /// tensor that is the result of an op, which cannot be marked trainable later).
    struct Move<'a>(&'a burn::tensor::Device);
    impl burn::module::ModuleMapper for Move<'_> {
        fn map_float<const D: usize>(
            &mut self,
            p: burn::module::Param<burn::tensor::Tensor<D>>,
        ) -> burn::module::Param<burn::tensor::Tensor<D>> {
            let (id, t, mapper) = p.consume();
            let grad = t.is_require_grad();
            let moved = burn::tensor::Tensor::<D>::from_data(t.into_data(), self.0);
            let moved = if grad { moved.require_grad() } else { moved };
            burn::module::Param::from_mapped_value(id, moved, mapper)
        }
    }
    let model = init(&cpu);
    model.visit(&mut Draw);
    if *device == cpu {
        return model;
    }
    model.map(&mut Move(device))
}

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
