//! DINOv2 (Oquab et al. 2023; transformers `Dinov2Model`, `Dinov2WithRegistersModel` for Darcet et al.'s register
//! tokens): a pre-LN ViT trained self-supervised, whose features carry the spatial detail CLIP's lack (the "DINO"
//! half of Prismatic's DINOv2 + SigLIP). Differences from CLIP that a port trips over: the patch conv has a bias;
//! there is no pre-layernorm; each residual branch is scaled by a learned per-channel `layer_scale` (λ); position
//! embeddings are one [1, 1 + patches, d] parameter, interpolated bicubically for other resolutions (with
//! antialiasing when registers are present — see `positions`); register tokens sit between CLS and the patches and
//! get no position embedding. Feature selection reads hidden states before the final `layernorm`, as for CLIP.
//! Keys: the hub layout (`attention.attention.query`, `attention.output.dense`) is what mitune writes;
//! transformers 5's renamed layout (`attention.q_proj`, `attention.o_proj`) is accepted on read.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};
use crate::zoo::layers::act::Act;
use crate::zoo::layers::{attention, patch};
use crate::zoo::llms::config::parse_act;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dinov2Spec {
    pub hidden_size: usize,
    /// hidden_size × mlp_ratio
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_channels: usize,
    pub patch_size: usize,
    /// Resolution the position embeddings were trained at.
    pub image_size: usize,
    /// Resolution images are fed at (position embeddings interpolated when it differs).
    pub input_size: usize,
    pub layer_norm_eps: f64,
    pub act: Act,
    pub qkv_bias: bool,
    pub layerscale_value: f64,
    /// Register tokens (0 for `Dinov2Model`).
    pub registers: usize,
}

#[derive(Deserialize)]
struct HfDinov2 {
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "four")]
    mlp_ratio: f64,
    #[serde(default = "three")]
    num_channels: usize,
    patch_size: usize,
    image_size: usize,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default = "gelu")]
    hidden_act: String,
    #[serde(default = "yes")]
    qkv_bias: bool,
    #[serde(default = "one")]
    layerscale_value: f64,
    #[serde(default)]
    use_swiglu_ffn: bool,
    #[serde(default)]
    num_register_tokens: usize,
}
fn four() -> f64 {
    4.0
}
fn three() -> usize {
    3
}
fn eps() -> f64 {
    1e-6
}
fn gelu() -> String {
    "gelu".into()
}
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl Dinov2Spec {
    /// From a `Dinov2Config` / `Dinov2WithRegistersConfig` (`model_type` dinov2 / dinov2_with_registers).
    pub fn from_hf(v: &serde_json::Value, path: &Path, prefix: &str) -> Result<Self> {
        let c: HfDinov2 = serde_json::from_value(v.clone()).map_err(|e| {
            Error::key(
                path,
                prefix.trim_end_matches('.'),
                format!("not a DINOv2 config: {e}"),
            )
        })?;
        if c.use_swiglu_ffn {
            return Err(Error::key(
                path,
                format!("{prefix}use_swiglu_ffn"),
                "the SwiGLU feed-forward of DINOv2-giant is not in mitune's zoo yet (ViT-S/B/L use the MLP)",
            ));
        }
        if c.image_size % c.patch_size != 0 {
            return Err(Error::key(
                path,
                format!("{prefix}image_size"),
                "image_size must be a multiple of patch_size",
            ));
        }
        let registers = if c.model_type == "dinov2_with_registers" {
            c.num_register_tokens
        } else {
            0
        };
        Ok(Dinov2Spec {
            hidden_size: c.hidden_size,
            intermediate_size: (c.hidden_size as f64 * c.mlp_ratio) as usize,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_channels: c.num_channels,
            patch_size: c.patch_size,
            image_size: c.image_size,
            input_size: c.image_size,
            layer_norm_eps: c.layer_norm_eps,
            act: parse_act(&c.hidden_act, path, &format!("{prefix}hidden_act"))?,
            qkv_bias: c.qkv_bias,
            layerscale_value: c.layerscale_value,
            registers,
        })
    }

    pub fn to_hf(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "model_type": if self.registers > 0 { "dinov2_with_registers" } else { "dinov2" },
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            // transformers 5 types mlp_ratio as an int: write one when the ratio is whole
            "mlp_ratio": if self.intermediate_size % self.hidden_size == 0 {
                serde_json::Value::from(self.intermediate_size / self.hidden_size)
            } else {
                serde_json::Value::from(self.intermediate_size as f64 / self.hidden_size as f64)
            },
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.act.hf_name(),
            "qkv_bias": self.qkv_bias,
            "layerscale_value": self.layerscale_value,
            "use_swiglu_ffn": false,
        });
        if self.registers > 0 {
            v["num_register_tokens"] = self.registers.into();
        }
        v
    }

    pub fn hf_architecture(&self) -> &'static str {
        if self.registers > 0 {
            "Dinov2WithRegistersModel"
        } else {
            "Dinov2Model"
        }
    }

    /// Patches per side at the input resolution.
    pub fn grid(&self) -> usize {
        self.input_size / self.patch_size
    }

    /// Tokens the tower outputs per image: CLS, registers, patches.
    pub fn num_tokens(&self) -> usize {
        1 + self.registers + self.grid() * self.grid()
    }

    pub fn init(&self, device: &Device) -> Dinov2 {
        let d = self.hidden_size;
        let p = self.patch_size;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let n_pos = (self.image_size / p).pow(2) + 1;
        let scale = || LayerScale {
            lambda1: Param::from_tensor(Tensor::ones([d], device) * self.layerscale_value),
        };
        Dinov2 {
            embeddings: Dinov2Embeddings {
                cls_token: Param::from_tensor(Tensor::random(
                    [1, 1, d],
                    Distribution::Normal(0.0, 0.02),
                    device,
                )),
                register_tokens: (self.registers > 0).then(|| {
                    Param::from_tensor(Tensor::random(
                        [1, self.registers, d],
                        Distribution::Normal(0.0, 0.02),
                        device,
                    ))
                }),
                position_embeddings: Param::from_tensor(Tensor::random(
                    [1, n_pos, d],
                    Distribution::Normal(0.0, 0.02),
                    device,
                )),
                patch_embeddings: PatchEmbeddings {
                    projection: Conv {
                        weight: Param::from_tensor(Tensor::random(
                            [d, self.num_channels, p, p],
                            Distribution::Normal(0.0, 0.02),
                            device,
                        )),
                        bias: Param::from_tensor(Tensor::zeros([d], device)),
                    },
                },
            },
            encoder: Dinov2Encoder {
                layer: (0..self.num_layers)
                    .map(|_| Dinov2Layer {
                        norm1: ln(),
                        attention: Dinov2Attention {
                            attention: SelfAttention {
                                query: lin(d, d, self.qkv_bias),
                                key: lin(d, d, self.qkv_bias),
                                value: lin(d, d, self.qkv_bias),
                                heads: self.num_heads,
                            },
                            output: AttentionOutput {
                                dense: lin(d, d, true),
                            },
                        },
                        layer_scale1: scale(),
                        norm2: ln(),
                        mlp: Dinov2Mlp {
                            fc1: lin(d, self.intermediate_size, true),
                            fc2: lin(self.intermediate_size, d, true),
                            act: self.act,
                        },
                        layer_scale2: scale(),
                    })
                    .collect(),
            },
            layernorm: ln(),
            spec: self.clone(),
        }
    }
}

/// A conv with kernel = stride = patch size, stored in PyTorch's layout [d, c, p, p].
#[derive(Module, Debug)]
pub struct Conv {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
pub struct PatchEmbeddings {
    pub projection: Conv,
}

#[derive(Module, Debug)]
pub struct Dinov2Embeddings {
    /// [1, 1, d]
    pub cls_token: Param<Tensor<3>>,
    /// [1, registers, d]
    pub register_tokens: Option<Param<Tensor<3>>>,
    /// [1, 1 + patches, d]
    pub position_embeddings: Param<Tensor<3>>,
    pub patch_embeddings: PatchEmbeddings,
}

#[derive(Module, Debug)]
pub struct SelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    #[module(skip)]
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct AttentionOutput {
    pub dense: Linear,
}

#[derive(Module, Debug)]
pub struct Dinov2Attention {
    pub attention: SelfAttention,
    pub output: AttentionOutput,
}

#[derive(Module, Debug)]
pub struct LayerScale {
    pub lambda1: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
pub struct Dinov2Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub act: Act,
}

#[derive(Module, Debug)]
pub struct Dinov2Layer {
    pub norm1: LayerNorm,
    pub attention: Dinov2Attention,
    pub layer_scale1: LayerScale,
    pub norm2: LayerNorm,
    pub mlp: Dinov2Mlp,
    pub layer_scale2: LayerScale,
}

#[derive(Module, Debug)]
pub struct Dinov2Encoder {
    pub layer: Vec<Dinov2Layer>,
}

#[derive(Module, Debug)]
pub struct Dinov2 {
    pub embeddings: Dinov2Embeddings,
    pub encoder: Dinov2Encoder,
    pub layernorm: LayerNorm,
    #[module(skip)]
    pub spec: Dinov2Spec,
}

impl Dinov2Layer {
    /// x: [n, t, d] -> [n, t, d]
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, t, d] = x.dims();
        let a = &self.attention.attention;
        let h = a.heads;
        let y = self.norm1.forward(x.clone());
        let split = |l: &Linear| {
            l.forward(y.clone())
                .reshape([n, t, h, d / h])
                .swap_dims(1, 2)
        };
        let o = attention::attend(split(&a.query), split(&a.key), split(&a.value), None); // [n, h, t, hd]
        let o = self
            .attention
            .output
            .dense
            .forward(o.swap_dims(1, 2).reshape([n, t, d]));
        let x = x + o * self.layer_scale1.lambda1.val().reshape([1, 1, d]);
        let y = self.norm2.forward(x.clone());
        let y = self
            .mlp
            .fc2
            .forward(self.mlp.act.forward(self.mlp.fc1.forward(y)));
        x + y * self.layer_scale2.lambda1.val().reshape([1, 1, d])
    }
}

impl Dinov2 {
    /// Position embeddings [1 + gh·gw, d] for a gh×gw grid: the trained table, or its patch part resized
    /// bicubically (align_corners=False) as transformers' `interpolate_pos_encoding` — with PyTorch's antialiased
    /// bicubic for the register variant (`antialias=True`: Keys' cubic with a = −0.5, not −0.75, and a support
    /// widened when shrinking), written as two separable resampling matrices.
    fn positions(&self, gh: usize, gw: usize) -> Tensor<2> {
        let table = self.embeddings.position_embeddings.val();
        let [_, n_pos, d] = table.dims();
        let table = table.reshape([n_pos, d]);
        let g0 = ((n_pos - 1) as f64).sqrt() as usize;
        if g0 == gh && g0 == gw {
            return table;
        }
        if self.spec.registers > 0 {
            let device = table.device();
            let patch = table.clone().slice([1..n_pos, 0..d]); // [g0·g0, d], rows = (y, x)
            let wh = crate::zoo::layers::float_tensor(aa_bicubic(g0, gh), [gh, g0], &device);
            let ww = crate::zoo::layers::float_tensor(aa_bicubic(g0, gw), [gw, g0], &device);
            let y = wh.matmul(patch.reshape([g0, g0 * d])).reshape([gh, g0, d]); // rows resized
            let x = ww
                .matmul(y.swap_dims(0, 1).reshape([g0, gh * d]))
                .reshape([gw, gh, d])
                .swap_dims(0, 1)
                .reshape([gh * gw, d]); // columns resized
            return Tensor::cat(vec![table.slice([0..1, 0..d]), x], 0);
        }
        patch::resize_positions(table, 1, gh, gw)
    }

    /// pixels: [n, c, s, s] -> embedding output [n, 1 + registers + patches, d] (hidden_states[0]).
    pub fn embed(&self, pixels: Tensor<4>) -> Tensor<3> {
        let [n, _, hh, ww] = pixels.dims();
        let p = self.spec.patch_size;
        let (gh, gw) = (hh / p, ww / p);
        let d = self.spec.hidden_size;
        let conv = &self.embeddings.patch_embeddings.projection;
        let x = patch::embed_patches(pixels, conv.weight.val(), Some(conv.bias.val()), p);
        let cls = self.embeddings.cls_token.val().expand([n, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1) + self.positions(gh, gw).unsqueeze::<3>();
        match &self.embeddings.register_tokens {
            Some(r) => {
                let k = r.dims()[1];
                let t = x.dims()[1];
                Tensor::cat(
                    vec![
                        x.clone().slice([0..n, 0..1, 0..d]),
                        r.val().expand([n, k, d]),
                        x.slice([0..n, 1..t, 0..d]),
                    ],
                    1,
                )
            }
            None => x,
        }
    }

    /// hidden_states[0..=last]: the embedding output and the outputs of the first `last` layers.
    pub fn hidden_states(&self, pixels: Tensor<4>, last: usize) -> Vec<Tensor<3>> {
        patch::hidden_states(
            self.embed(pixels),
            &self.encoder.layer,
            last,
            |l: &Dinov2Layer, x| l.forward(x),
        )
    }

    /// The tower's own output (all layers + layernorm): [n, tokens, d]; Dinov2Model's last_hidden_state.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        let mut states = self.hidden_states(pixels, self.spec.num_layers);
        self.layernorm.forward(states.pop().unwrap())
    }
}

/// The [out, input] matrix of PyTorch's antialiased bicubic resize along one axis (`interpolate(...,
/// mode="bicubic", antialias=True, align_corners=False)`, PIL's algorithm): output i is centred at
/// (i + ½)·scale; the cubic kernel (a = −0.5) is stretched by the scale when shrinking; weights are normalised.
pub fn aa_bicubic(input: usize, output: usize) -> Vec<f32> {
    let cubic = |x: f64| {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    let scale = input as f64 / output as f64;
    let support = 2.0 * scale.max(1.0);
    let inv = 1.0 / scale.max(1.0);
    let mut m = vec![0f32; output * input];
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
        let hi = ((center + support + 0.5).floor() as usize).min(input);
        let w: Vec<f64> = (lo..hi)
            .map(|j| cubic((j as f64 - center + 0.5) * inv))
            .collect();
        let total: f64 = w.iter().sum();
        for (j, wj) in (lo..hi).zip(w) {
            m[i * input + j] = (wj / total) as f32;
        }
    }
    m
}

/// The checkpoint names of a DINOv2 module path (None for another family's path): the hub layout first (what
/// mitune writes), then transformers 5's renamed attention (`attention.q_proj` …, accepted on read). DINOv2
/// towers are stored without CLIP's `vision_model.` level.
pub fn hf_keys(path: &str) -> Option<Vec<String>> {
    let ours = path.starts_with("encoder.layer.")
        || path.starts_with("layernorm.")
        || [
            "embeddings.cls_token",
            "embeddings.register_tokens",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.",
        ]
        .iter()
        .any(|p| path.starts_with(p));
    if !ours {
        return None;
    }
    let v5 = path
        .replace("attention.attention.query", "attention.q_proj")
        .replace("attention.attention.key", "attention.k_proj")
        .replace("attention.attention.value", "attention.v_proj")
        .replace("attention.output.dense", "attention.o_proj");
    Some(if v5 == path {
        vec![path.to_string()]
    } else {
        vec![path.to_string(), v5]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values from PyTorch 2.15: column b of the matrix is
    /// `interpolate(e_b, size=(out, ·), mode="bicubic", align_corners=False, antialias=True)` along one axis.
    #[test]
    fn antialiased_bicubic_matches_pytorch() {
        let cases: [(usize, usize, &[f32]); 2] = [
            (
                5,
                3,
                &[
                    0.584615, 0.446154, 0.0, -0.030769, 0.0, -0.037209, 0.246512, 0.581395,
                    0.246512, -0.037209, 0.0, -0.030769, 0.0, 0.446154, 0.584615,
                ],
            ),
            (
                4,
                6,
                &[
                    1.065789, -0.065789, 0.0, 0.0, 0.529412, 0.529412, -0.058824, 0.0, -0.05787,
                    0.9375, 0.131945, -0.011574, -0.011574, 0.131944, 0.9375, -0.05787, 0.0,
                    -0.058824, 0.529412, 0.529412, 0.0, 0.0, -0.06579, 1.06579,
                ],
            ),
        ];
        for (i, o, want) in cases {
            let got = aa_bicubic(i, o);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 2e-6, "{i}->{o}: {got:?}");
            }
        }
    }
}
