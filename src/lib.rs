//! mitune: staged training of multimodal LLMs (encoder + connector + LLM) over burn.
//! See README.md for the commands and shared/STYLE.md for the architecture.
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod generate;
pub mod model;
pub mod recipe;
pub mod report;
pub mod stages;
pub mod zoo;

#[cfg(test)]
mod flex_kernels;

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

/// What `MITUNE_DEVICE` names: `flex` (the CPU; the default), `wgpu[:SEL]`, `vulkan[:SEL]` or `cuda[:SEL]`, where
/// SEL is `N` (the N-th discrete GPU; for cuda the N-th device), `local` (the GPU numbered by this process's rank on
/// its node under mpirun / srun: one rank per GPU) or, for wgpu/vulkan, `cpu` (the CPU adapter, e.g. lavapipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Flex,
    Wgpu(Adapter),
    Vulkan(Adapter),
    Cuda(usize),
}

/// Which adapter of a wgpu/vulkan backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    /// The backend's pick (its highest-powered GPU).
    Default,
    Discrete(usize),
    Cpu,
}

/// Parses a `MITUNE_DEVICE` value; `local_rank` is what `:local` stands for.
pub fn parse_device(value: &str, local_rank: usize) -> std::result::Result<DeviceSpec, String> {
    let (backend, sel) = match value.split_once(':') {
        Some((b, s)) => (b, Some(s)),
        None => (value, None),
    };
    let index = |s: &str| -> std::result::Result<usize, String> {
        match s {
            "local" => Ok(local_rank),
            _ => s.parse().map_err(|_| {
                format!("MITUNE_DEVICE={value}: `{s}` is not a device number, `local` or `cpu`")
            }),
        }
    };
    let adapter = |sel: Option<&str>| -> std::result::Result<Adapter, String> {
        match sel {
            None | Some("default") => Ok(Adapter::Default),
            Some("cpu") => Ok(Adapter::Cpu),
            Some(s) => index(s).map(Adapter::Discrete),
        }
    };
    let spec = match backend {
        "" | "flex" if sel.is_none() => DeviceSpec::Flex,
        "wgpu" => DeviceSpec::Wgpu(adapter(sel)?),
        "vulkan" => DeviceSpec::Vulkan(adapter(sel)?),
        "cuda" => DeviceSpec::Cuda(sel.map(index).transpose()?.unwrap_or(0)),
        _ => {
            return Err(format!(
                "MITUNE_DEVICE={value}: expected flex, wgpu[:N|:local|:cpu], vulkan[:N|:local|:cpu] or cuda[:N|:local]"
            ));
        }
    };
    let built = match spec {
        DeviceSpec::Flex => true,
        DeviceSpec::Wgpu(_) => cfg!(feature = "wgpu"),
        DeviceSpec::Vulkan(_) => cfg!(feature = "vulkan"),
        DeviceSpec::Cuda(_) => cfg!(feature = "cuda"),
    };
    if !built {
        return Err(format!(
            "MITUNE_DEVICE={value}: this build has no `{backend}` backend; build with `cargo build --release --features {backend}`"
        ));
    }
    Ok(spec)
}

/// `MITUNE_DEVICE` parsed for this process (`:local` = its rank on the node, `dist::local_rank`).
pub fn device_spec() -> std::result::Result<DeviceSpec, String> {
    match std::env::var("MITUNE_DEVICE") {
        Ok(v) => parse_device(&v, dist::local_rank()),
        Err(_) => Ok(DeviceSpec::Flex),
    }
}

/// Checks that the adapter `MITUNE_DEVICE` names exists by creating one tensor on it: cubecl panics (on its
/// device thread) when asked for an adapter the machine lacks, so that panic is caught here, kept quiet, and turned
/// into a message.
pub fn probe_device() -> std::result::Result<(), String> {
    if device_spec()? == DeviceSpec::Flex {
        return Ok(());
    }
    let hook = std::panic::take_hook();
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let keep = said.clone();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut s) = keep.lock()
            && s.is_empty()
        {
            *s = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|m| m.to_string()))
                .unwrap_or_default();
        }
    }));
    let ok = std::panic::catch_unwind(|| {
        let t = burn::tensor::Tensor::<1>::zeros([1], &default_device());
        let _ = t.into_data();
    })
    .is_ok();
    std::panic::set_hook(hook);
    if ok {
        return Ok(());
    }
    let why = said.lock().map(|s| s.clone()).unwrap_or_default();
    let why: String = why.chars().take(300).collect();
    Err(format!(
        "MITUNE_DEVICE={}: the backend could not open this adapter ({why}); pick another index, or `:cpu`",
        std::env::var("MITUNE_DEVICE").unwrap_or_default()
    ))
}

/// The compute device `MITUNE_DEVICE` names (flex, the CPU, when unset). The CLI checks the variable and the
/// adapter before any command (`probe_device`), so a value this build or machine cannot serve stops there.
pub fn default_device() -> burn::tensor::Device {
    #[cfg(any(feature = "wgpu", feature = "vulkan"))]
    let kind = |a: Adapter| match a {
        Adapter::Default => burn::tensor::DeviceKind::DefaultDevice,
        Adapter::Discrete(i) => burn::tensor::DeviceKind::DiscreteGpu(i),
        Adapter::Cpu => burn::tensor::DeviceKind::Cpu,
    };
    match device_spec() {
        #[cfg(feature = "wgpu")]
        Ok(DeviceSpec::Wgpu(a)) => burn::tensor::Device::wgpu(kind(a)),
        #[cfg(feature = "vulkan")]
        Ok(DeviceSpec::Vulkan(a)) => burn::tensor::Device::vulkan(kind(a)),
        #[cfg(feature = "cuda")]
        Ok(DeviceSpec::Cuda(i)) => burn::tensor::Device::cuda(i),
        _ => burn::tensor::Device::flex(),
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn device_values_parse_or_say_why() {
        assert_eq!(parse_device("flex", 3), Ok(DeviceSpec::Flex));
        let wgpu = parse_device("wgpu:local", 3);
        let cuda = parse_device("cuda:1", 3);
        if cfg!(feature = "wgpu") {
            assert_eq!(wgpu, Ok(DeviceSpec::Wgpu(Adapter::Discrete(3))));
            assert_eq!(
                parse_device("wgpu", 0),
                Ok(DeviceSpec::Wgpu(Adapter::Default))
            );
            assert_eq!(
                parse_device("wgpu:cpu", 0),
                Ok(DeviceSpec::Wgpu(Adapter::Cpu))
            );
            assert_eq!(
                parse_device("wgpu:2", 0),
                Ok(DeviceSpec::Wgpu(Adapter::Discrete(2)))
            );
        } else {
            assert!(wgpu.unwrap_err().contains("--features wgpu"));
        }
        if cfg!(feature = "cuda") {
            assert_eq!(cuda, Ok(DeviceSpec::Cuda(1)));
        } else {
            assert!(cuda.unwrap_err().contains("no `cuda` backend"));
        }
        let e = parse_device("gpu", 0).unwrap_err();
        assert!(e.contains("expected flex, wgpu"), "{e}");
        let e = parse_device("wgpu:first", 0).unwrap_err();
        assert!(e.contains("`first` is not a device number"), "{e}");
        assert!(parse_device("flex:1", 0).is_err());
    }
}
