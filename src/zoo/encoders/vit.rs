//! The vision transformer behind CLIP ViT (transformers `modeling_clip.py`, Radford et al. 2021) and SigLIP
//! (`modeling_siglip.py`, Zhai et al. 2023): patch embedding, (class token), position embeddings, (pre-LN),
//! pre-LN encoder blocks, post-LN. LLaVA reads hidden states *before* `post_layernorm`.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::tensor::{DType, Device, Distribution, Tensor};

use super::VitSpec;
use crate::zoo::layers::act::Act;
use crate::zoo::layers::{attention, patch, precision};

/// A conv with kernel = stride = patch size, stored in PyTorch's conv layout [d, c, p, p].
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
}

#[derive(Module, Debug)]
pub struct VisionEmbeddings {
    pub class_embedding: Option<Param<Tensor<1>>>,
    pub patch_embedding: PatchEmbed,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct VitAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
}

#[derive(Module, Debug)]
pub struct VitMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub act: Act,
}

#[derive(Module, Debug)]
pub struct VitLayer {
    pub self_attn: VitAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: VitMlp,
    pub layer_norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct VitEncoder {
    pub layers: Vec<VitLayer>,
}

#[derive(Module, Debug)]
pub struct VisionTower {
    pub embeddings: VisionEmbeddings,
    pub pre_layrnorm: Option<LayerNorm>,
    pub encoder: VitEncoder,
    pub post_layernorm: LayerNorm,
    #[module(skip)]
    pub spec: VitSpec,
}

impl VitSpec {
    pub fn init(&self, device: &Device) -> VisionTower {
        let d = self.hidden_size;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let p = self.patch_size;
        let n_pos = (self.image_size / p).pow(2) + usize::from(self.has_cls());
        let siglip = !self.has_cls();
        VisionTower {
            embeddings: VisionEmbeddings {
                class_embedding: self.has_cls().then(|| {
                    Param::from_tensor(Tensor::random([d], Distribution::Normal(0.0, 1.0), device))
                }),
                patch_embedding: PatchEmbed {
                    weight: Param::from_tensor(Tensor::random(
                        [d, self.num_channels, p, p],
                        Distribution::Normal(0.0, 0.02),
                        device,
                    )),
                    bias: siglip.then(|| Param::from_tensor(Tensor::zeros([d], device))),
                },
                position_embedding: EmbeddingConfig::new(n_pos, d).init(device),
            },
            pre_layrnorm: self.has_cls().then(ln),
            encoder: VitEncoder {
                layers: (0..self.num_layers)
                    .map(|_| VitLayer {
                        self_attn: VitAttention {
                            q_proj: lin(d, d),
                            k_proj: lin(d, d),
                            v_proj: lin(d, d),
                            out_proj: lin(d, d),
                            num_heads: self.num_heads,
                        },
                        layer_norm1: ln(),
                        mlp: VitMlp {
                            fc1: lin(d, self.intermediate_size),
                            fc2: lin(self.intermediate_size, d),
                            act: self.act,
                        },
                        layer_norm2: ln(),
                    })
                    .collect(),
            },
            post_layernorm: ln(),
            spec: self.clone(),
        }
    }
}

impl VitLayer {
    /// x: [n, t, d] -> [n, t, d]
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, t, d] = x.dims();
        let h = self.self_attn.num_heads;
        let y = self.layer_norm1.forward(x.clone());
        let split = |l: &Linear| {
            l.forward(y.clone())
                .reshape([n, t, h, d / h])
                .swap_dims(1, 2)
        }; // [n, h, t, hd]
        let o = attention::attend(
            split(&self.self_attn.q_proj),
            split(&self.self_attn.k_proj),
            split(&self.self_attn.v_proj),
            None,
        );
        let x = x + self
            .self_attn
            .out_proj
            .forward(o.swap_dims(1, 2).reshape([n, t, d]));
        let y = self.layer_norm2.forward(x.clone());
        // the feed-forward in bf16 inside an autocast scope
        x + precision::within(y, |y| {
            self.mlp
                .fc2
                .forward(self.mlp.act.forward(self.mlp.fc1.forward(y)))
        })
    }
}

impl VisionTower {
    /// pixels: [n, c, s, s] -> embedding output [n, tokens, d] (after `pre_layrnorm` for CLIP).
    pub fn embed(&self, pixels: Tensor<4>) -> Tensor<3> {
        let [n, _, hh, ww] = pixels.dims();
        let p = self.spec.patch_size;
        let d = self.spec.hidden_size;
        let pe = &self.embeddings.patch_embedding;
        let mut x = patch::embed_patches(
            pixels,
            pe.weight.val(),
            pe.bias.as_ref().map(|b| b.val()),
            p,
        );
        if let Some(cls) = &self.embeddings.class_embedding {
            let cls = cls.val().reshape([1, 1, d]).expand([n, 1, d]);
            x = Tensor::cat(vec![cls, x], 1);
        }
        let pos = patch::resize_positions(
            // the table may be stored in bf16 (`frozen_dtype`)
            precision::to(self.embeddings.position_embedding.weight.val(), DType::F32),
            usize::from(self.spec.has_cls()),
            hh / p,
            ww / p,
        );
        let x = x + pos.unsqueeze::<3>();
        match &self.pre_layrnorm {
            Some(ln) => ln.forward(x),
            None => x,
        }
    }

    /// hidden_states[0..=last]: the embedding output and the outputs of the first `last` blocks.
    pub fn hidden_states(&self, pixels: Tensor<4>, last: usize) -> Vec<Tensor<3>> {
        patch::hidden_states(
            self.embed(pixels),
            &self.encoder.layers,
            last,
            |l: &VitLayer, x| l.forward(x),
        )
    }

    /// The tower's own output (all blocks + post_layernorm): [n, tokens, d]; CLIPVisionModel's last_hidden_state.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        let mut x = self.embed(pixels);
        for layer in &self.encoder.layers {
            x = layer.forward(x);
        }
        self.post_layernorm.forward(x)
    }
}
