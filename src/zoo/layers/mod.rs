//! Building blocks shared by the zoo's families: activations, rotary embeddings, attention, norms.
pub mod act;
pub mod attention;
pub(crate) mod cpu;
pub mod flash;
pub mod fused;
pub mod linear;
pub mod logprob;
pub mod mlp;
pub mod norm;
pub mod patch;
pub mod precision;
pub mod rope;

use burn::tensor::{Device, Int, Tensor, TensorData};

/// A float tensor from row-major values.
pub fn float_tensor<const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// An int tensor from row-major ids.
pub fn int_tensor<const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(values, shape).convert::<i32>(), device)
}

/// Row-major f32 values of a float tensor (syncs with the device).
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    // a QLoRA base is stored quantized: its values are the dequantized ones
    let t = if matches!(t.dtype(), burn::tensor::DType::QFloat(_)) {
        t.dequantize()
    } else {
        t
    };
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensor")
}
