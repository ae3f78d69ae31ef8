//! LLaVA assembly (Liu et al. 2023, transformers `modeling_llava.py`): encoder → feature selection → connector →
//! projected features scattered into the positions of the image placeholder tokens of the prompt → LLM.
//! Each `<image>` marker has already been expanded into that image's placeholder ids (see `data::templates`), so
//! sequences batch like text; rows may hold 0, 1 or several images. Most layouts give every image the same count;
//! LLaVA-NeXT's AnyRes (`zoo::anyres`) gives each image a count that depends on its size, and its pixels are the
//! tiles of all images stacked, with each image's original size alongside.
use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::zoo::anyres::AnyRes;
use crate::zoo::connectors::{Connector, ConnectorSpec, Features};
use crate::zoo::encoders::{Encoder, FeatureSelect, VisionSpec};
use crate::zoo::layers::int_tensor;
use crate::zoo::llms::{KvCache, Llm, LlmSpec};
use crate::zoo::native::{Kind, NativeRes};
use crate::zoo::sizing::Sizing;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaSpec {
    pub vision: VisionSpec,
    pub select: FeatureSelect,
    pub connector: ConnectorSpec,
    pub projector_bias: bool,
    pub llm: LlmSpec,
    pub image_token_id: i64,
    /// LLaVA-NeXT's high-resolution tiling (`LlavaNextForConditionalGeneration`); `None` for one tile per image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anyres: Option<AnyRes>,
    /// Qwen2-VL's native resolution (`Qwen2VLForConditionalGeneration`): images keep their size, tokens carry
    /// 3-D M-RoPE positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<NativeRes>,
}

#[derive(Module, Debug)]
pub struct Llava {
    pub vision_tower: Encoder,
    pub multi_modal_projector: Connector,
    pub language_model: Llm,
    /// AnyRes's learned end-of-row embedding [d_llm] (transformers' `model.image_newline`).
    pub image_newline: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub spec: LlavaSpec,
}

/// A model built around a LLaVA: the LLaVA itself, or a stage's model with its own layers beside it (the reward
/// model's score, PPO's value head). Adapters attach to its LLaVA, and their PEFT files describe that LLaVA.
pub trait Backbone: Module + Sized {
    fn llava(&self) -> &Llava;
    /// The same model with its LLaVA replaced by `f(llava)`.
    fn map_llava(self, f: impl FnOnce(Llava) -> Result<Llava>) -> Result<Self>;
}

impl Backbone for Llava {
    fn llava(&self) -> &Llava {
        self
    }
    fn map_llava(self, f: impl FnOnce(Llava) -> Result<Llava>) -> Result<Self> {
        f(self)
    }
}

/// What fills a batch's placeholder positions, in reading order (row by row). One variant per modality: a new
/// modality (video frames, audio) is a new variant here and an arm in `Llava::input_embeds`, not a field threaded
/// through every signature.
#[derive(Debug, Clone)]
pub enum Media {
    /// [n_images, c, s, s]: each image fills `image_tokens()` consecutive `image_token_id` placeholders.
    Images(Tensor<4>),
    /// Images with the instruction each is asked about, for a connector that reads it (InstructBLIP's Q-Former):
    /// one row of ids in the connector's own vocabulary per image.
    InstructedImages {
        pixels: Tensor<4>,
        instructions: Vec<Vec<i64>>,
    },
    /// Clips for a native-resolution model (Qwen2-VL): every clip's patches in turn, [patches, 3·temporal, p, p]
    /// (as `pixel_values_videos`), each clip's patch grid (frames / temporal, rows, cols) and the seconds one
    /// temporal patch spans (`second_per_grid_ts`); each clip fills its grid's tokens of `video_token_id`.
    Videos {
        pixels: Tensor<4>,
        grids: Vec<[usize; 3]>,
        seconds_per_grid: Vec<f64>,
    },
}

/// A batch of token rows (already padded to one length) and the media its placeholders stand for.
pub struct MmInput {
    /// [b][t] token ids, placeholders included.
    pub ids: Vec<Vec<i64>>,
    /// [b][t] false at padding.
    pub attention: Vec<Vec<bool>>,
    /// At most one entry per modality, each in the order its placeholders appear (row by row).
    pub media: Vec<Media>,
    /// Each image's original (height, width), in placeholder order: what AnyRes tiles and counts by. May be empty
    /// for a model whose images all take one tile.
    pub image_sizes: Vec<[u32; 2]>,
    /// Images of each row (sample), in order; empty = every image is alone in its sample. LLaVA-OneVision tiles an
    /// image only when it is alone.
    pub images_per_row: Vec<usize>,
    /// Native resolution: each image's patch grid as its data source's pixel budget fixed it when the dataset was
    /// built (a per-source budget); empty = from each size under the model's budget.
    pub image_grids: Vec<[usize; 3]>,
    /// Packed rows (`pack = true`): [b][t] which sample of its row each token belongs to (1, 2, …; 0 = padding);
    /// attention stays within a sample and positions restart at each. Empty = one sample per row.
    pub segments: Vec<Vec<u32>>,
}

impl MmInput {
    /// A batch whose media are `pixels` (none when `None`).
    pub fn new(ids: Vec<Vec<i64>>, attention: Vec<Vec<bool>>, pixels: Option<Tensor<4>>) -> Self {
        MmInput {
            ids,
            attention,
            media: pixels.map(Media::Images).into_iter().collect(),
            image_sizes: vec![],
            images_per_row: vec![],
            image_grids: vec![],
            segments: vec![],
        }
    }

    /// The same batch with packed rows (see `segments`).
    pub fn with_segments(mut self, segments: Vec<Vec<u32>>) -> Self {
        self.segments = segments;
        self
    }

    /// The same batch with each image's native-resolution patch grid fixed (see `image_grids`).
    pub fn with_grids(mut self, grids: Vec<[usize; 3]>) -> Self {
        self.image_grids = grids;
        self
    }

    /// The same one-sample input with each image's original (height, width) attached.
    pub fn with_sizes(mut self, sizes: Vec<[u32; 2]>) -> Self {
        self.images_per_row = vec![sizes.len()];
        self.image_sizes = sizes;
        self
    }

    /// The same batch with each image's original (height, width) and each row's number of images.
    pub fn with_rows(mut self, sizes: Vec<[u32; 2]>, images_per_row: Vec<usize>) -> Self {
        self.image_sizes = sizes;
        self.images_per_row = images_per_row;
        self
    }

    /// For each image: whether it is the only image of its row.
    pub fn alone(&self) -> Vec<bool> {
        if self.images_per_row.is_empty() {
            return vec![true; self.image_sizes.len()];
        }
        self.images_per_row
            .iter()
            .flat_map(|&n| std::iter::repeat_n(n == 1, n))
            .collect()
    }

    pub fn single(ids: Vec<i64>, pixels: Option<Tensor<4>>) -> Self {
        let attention = vec![vec![true; ids.len()]];
        MmInput::new(vec![ids], attention, pixels)
    }

    /// The same batch with each image's instruction attached (for a connector that reads one); no change when
    /// `instructions` is empty.
    pub fn with_instructions(mut self, instructions: Vec<Vec<i64>>) -> Self {
        if instructions.is_empty() {
            return self;
        }
        self.media = self
            .media
            .into_iter()
            .map(|m| match m {
                Media::Images(pixels) | Media::InstructedImages { pixels, .. } => {
                    Media::InstructedImages {
                        pixels,
                        instructions: instructions.clone(),
                    }
                }
                v @ Media::Videos { .. } => v,
            })
            .collect();
        self
    }

    /// The same batch with clips (`Media::Videos`); no change when there are none.
    pub fn with_videos(
        mut self,
        pixels: Option<Tensor<4>>,
        grids: Vec<[usize; 3]>,
        seconds_per_grid: Vec<f64>,
    ) -> Self {
        if let Some(pixels) = pixels {
            self.media.push(Media::Videos {
                pixels,
                grids,
                seconds_per_grid,
            });
        }
        self
    }

    /// The images of the batch, [n, c, s, s], if any.
    pub fn images(&self) -> Option<&Tensor<4>> {
        self.media.iter().find_map(|m| match m {
            Media::Images(p) | Media::InstructedImages { pixels: p, .. } => Some(p),
            Media::Videos { .. } => None,
        })
    }

    /// The clips of the batch: patches, grids and seconds per temporal patch.
    pub fn videos(&self) -> Option<(&Tensor<4>, &[[usize; 3]], &[f64])> {
        self.media.iter().find_map(|m| match m {
            Media::Videos {
                pixels,
                grids,
                seconds_per_grid,
            } => Some((pixels, grids.as_slice(), seconds_per_grid.as_slice())),
            _ => None,
        })
    }

    /// Each image's instruction, when the media carry them.
    pub fn instructions(&self) -> Option<&[Vec<i64>]> {
        self.media.iter().find_map(|m| match m {
            Media::InstructedImages { instructions, .. } => Some(instructions.as_slice()),
            _ => None,
        })
    }
}

impl LlavaSpec {
    /// What the encoder hands the connector per image (tokens, width, patch grid).
    pub fn features(&self) -> Features {
        self.select.features(&self.vision)
    }

    /// Image tokens per image (per tile for AnyRes) as the LLM sees them: the connector's count (0 for a spec that
    /// fails `validate`).
    pub fn image_tokens(&self) -> usize {
        self.connector.out_tokens(&self.features()).unwrap_or(0)
    }

    /// Image tokens for an image of original (height, width), `alone` in its sample: `image_tokens()` unless AnyRes
    /// counts by size.
    pub fn image_tokens_for(&self, h: u32, w: u32, alone: bool) -> usize {
        match self.sizing() {
            Some(s) => s.tokens(h, w, alone).unwrap_or(0),
            None => self.image_tokens(),
        }
    }

    /// How each image's size decides its tiles or patches and its tokens (`None`: a fixed count per image).
    pub fn sizing(&self) -> Option<Sizing> {
        match (&self.native, &self.anyres) {
            (Some(n), _) => Some(Sizing::Native(n.clone())),
            (None, Some(a)) => Some(Sizing::AnyRes(a.clone())),
            (None, None) => None,
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.vision.validate()?;
        self.select.indices(self.vision.num_layers())?;
        let out = self.connector.out_tokens(&self.features())?;
        if let Some(n) = &self.native {
            n.validate()?;
            let m = self
                .llm
                .rope
                .mrope_section
                .as_ref()
                .map(|s| s.iter().sum::<usize>());
            if m != Some(self.llm.head_dim / 2) {
                return Err(format!(
                    "text_config.rope_parameters.mrope_section {:?} must sum to head_dim / 2 = {}",
                    self.llm.rope.mrope_section,
                    self.llm.head_dim / 2
                ));
            }
        }
        if let Some(a) = &self.anyres {
            a.validate()?;
            let g = a.grid as usize;
            if self.features().grid != Some((g, g)) || out != g * g {
                return Err(format!(
                    "AnyRes stitches each tile's {g}×{g} feature grid: it needs features without a CLS token \
                     (vision_feature_select_strategy \"default\") and a connector that keeps one token per patch \
                     (linear or mlp), but the encoder gives {:?} and the connector {out} tokens per tile",
                    self.features().grid
                ));
            }
        }
        if self.llm.num_heads % self.llm.num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.llm.num_heads, self.llm.num_kv_heads
            ));
        }
        if self.image_token_id < 0 || self.image_token_id as usize >= self.llm.vocab_size {
            return Err(format!(
                "image_token_index {} is outside the vocabulary ({})",
                self.image_token_id, self.llm.vocab_size
            ));
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> Llava {
        Llava {
            vision_tower: self.vision.init(device),
            multi_modal_projector: self.connector.init(
                &self.features(),
                &self.llm,
                self.projector_bias,
                device,
            ),
            language_model: Llm::Decoder(self.llm.init(device)),
            // transformers' init: normal with std 1/sqrt(d)
            image_newline: self.anyres.as_ref().map(|_| {
                let d = self.llm.hidden_size;
                Param::from_tensor(Tensor::random(
                    [d],
                    Distribution::Normal(0.0, 1.0 / (d as f64).sqrt()),
                    device,
                ))
            }),
            spec: self.clone(),
        }
    }
}

impl Llava {
    /// Checks that placeholders and images agree before any compute: every image fills exactly its count of
    /// consecutive placeholder positions. `n_inputs`: encoder inputs (tiles for AnyRes, else images).
    pub fn check_images(
        &self,
        ids: &[Vec<i64>],
        n_inputs: usize,
        sizes: &[[u32; 2]],
        alone: &[bool],
    ) -> Result<()> {
        let found: usize = ids
            .iter()
            .flatten()
            .filter(|&&t| t == self.spec.image_token_id)
            .count();
        let Some(sizing) = self.spec.sizing() else {
            let per = self.spec.image_tokens();
            if found != per * n_inputs {
                return Err(Error::input(format!(
                    "image placeholders and images do not match: {found} placeholder tokens for {n_inputs} image(s) of {per} tokens each \
                     (each <image> marker needs exactly one image)"
                )));
            }
            return Ok(());
        };
        let (mut tiles, mut want) = (0, 0);
        for (&[h, w], &one) in sizes.iter().zip(alone) {
            tiles += sizing.inputs(h, w, one).map_err(Error::input)?;
            want += sizing.tokens(h, w, one).map_err(Error::input)?;
        }
        if tiles != n_inputs || found != want || alone.len() != sizes.len() {
            return Err(Error::input(format!(
                "image placeholders and images do not match: {found} placeholder tokens and {n_inputs} encoder inputs \
                 (tiles or patches) for {} image(s) whose sizes need {want} tokens and {tiles} inputs (each image \
                 marker needs exactly one image, expanded by the image's own size)",
                sizes.len()
            )));
        }
        Ok(())
    }

    /// Each image's native-resolution grid: as the input fixed it, else from its size under the model's budget.
    fn image_grids(&self, nr: &NativeRes, input: &MmInput) -> Result<Vec<[usize; 3]>> {
        if input.image_grids.is_empty() {
            grids(nr, &input.image_sizes)
        } else {
            Ok(input.image_grids.clone())
        }
    }

    /// `check_images` for images whose native-resolution grids were fixed with the data.
    fn check_grids(&self, ids: &[Vec<i64>], n_inputs: usize, grids: &[[usize; 3]]) -> Result<()> {
        check_native(
            &self.spec,
            ids,
            self.spec.image_token_id,
            grids,
            n_inputs,
            "image",
        )
    }

    /// The video placeholder id, for a model that reads clips.
    fn video_token(&self) -> Option<i64> {
        self.spec.native.as_ref().and_then(|n| n.video_token_id)
    }

    /// Checks that video placeholders and clips agree before any compute: each clip fills exactly its grid's
    /// tokens, and its patches are all there.
    pub fn check_videos(&self, ids: &[Vec<i64>], input: &MmInput) -> Result<()> {
        let found = match self.video_token() {
            Some(v) => ids.iter().flatten().filter(|&&t| t == v).count(),
            None => 0,
        };
        let Some((pixels, grids, seconds)) = input.videos() else {
            if found > 0 {
                return Err(Error::input(format!(
                    "{found} video placeholder tokens but no video: each video marker needs its clip"
                )));
            }
            return Ok(());
        };
        if self.spec.native.is_none() {
            return Err(Error::input(
                "this model does not read videos (only Qwen2-VL / Qwen2.5-VL checkpoints do): remove the clips",
            ));
        }
        if seconds.len() != grids.len() {
            return Err(Error::input(format!(
                "{} clip grids but {} seconds per temporal patch: give one per clip",
                grids.len(),
                seconds.len()
            )));
        }
        let video = self.video_token().unwrap_or(self.spec.image_token_id);
        check_native(&self.spec, ids, video, grids, pixels.dims()[0], "video")
    }

    /// Token embeddings with image and video features scattered into placeholder positions: [b, t, d].
    pub fn input_embeds(&self, input: &MmInput) -> Result<Tensor<3>> {
        let device = self.devices()[0].clone();
        let n_inputs = input.images().map_or(0, |p| p.dims()[0]);
        let alone = input.alone();
        if input.image_grids.is_empty() {
            self.check_images(&input.ids, n_inputs, &input.image_sizes, &alone)?;
        } else {
            self.check_grids(&input.ids, n_inputs, &input.image_grids)?;
        }
        self.check_videos(&input.ids, input)?;
        let (b, t) = (input.ids.len(), input.ids[0].len());
        let img = self.spec.image_token_id;
        let vid = self.video_token().unwrap_or(img);
        // Placeholder ids may lie outside the vocabulary in some checkpoints: embed them as 0, they are replaced.
        let flat: Vec<i64> = input
            .ids
            .iter()
            .flatten()
            .map(|&x| if x == img || x == vid { 0 } else { x })
            .collect();
        let embeds = self.language_model.embed(int_tensor(flat, [b, t], &device));
        let image_feats = match input.images().cloned() {
            None => None,
            Some(pixels) => Some(
                if let (Some(nr), Encoder::Qwen2Vit(_)) = (&self.spec.native, &self.vision_tower) {
                    // native resolution: every image's patches through the tower with its own grid
                    self.native_features(pixels, &self.image_grids(nr, input)?)?
                } else {
                    let feats = self.image_features(pixels, input.instructions())?; // [n, tokens, d]
                    self.pack(feats, &input.image_sizes, &alone) // [all image tokens, d]
                },
            ),
        };
        let video_feats = match input.videos() {
            Some((pixels, grids, _)) => Some(self.native_features(pixels.clone(), grids)?),
            None => None,
        };
        if image_feats.is_none() && video_feats.is_none() {
            return Ok(embeds);
        }
        let d = embeds.dims()[2];
        let n_img = image_feats.as_ref().map_or(0, |f| f.dims()[0]);
        // masked_scatter as a gather: row i of the output is source[idx[i]], where source stacks the text
        // embeddings, the image features and the video features, each in reading order.
        let (mut ki, mut kv) = (0, 0);
        let idx: Vec<i64> = input
            .ids
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, &x)| {
                if x == img {
                    ki += 1;
                    (b * t + ki - 1) as i64
                } else if x == vid {
                    kv += 1;
                    (b * t + n_img + kv - 1) as i64
                } else {
                    i as i64
                }
            })
            .collect();
        let mut parts = vec![embeds.reshape([b * t, d])];
        parts.extend(image_feats);
        parts.extend(video_feats);
        let source = Tensor::cat(parts, 0);
        Ok(source
            .select(0, int_tensor(idx, [b * t], &device))
            .reshape([b, t, d]))
    }

    /// Native-resolution patches [patches, 3·temporal, p, p] of images or clips with their grids -> their tokens
    /// [Σ tokens, d_llm] (the tower, then the merger).
    fn native_features(&self, pixels: Tensor<4>, grids: &[[usize; 3]]) -> Result<Tensor<2>> {
        let Encoder::Qwen2Vit(vit) = &self.vision_tower else {
            return Err(Error::input(
                "native-resolution patches need a Qwen2-VL vision tower",
            ));
        };
        let f = vit.forward(pixels, grids)?; // [patches, d_vit]
        let out = self.multi_modal_projector.forward(f.unsqueeze::<3>()); // [1, tokens, d]
        let [_, t, d] = out.dims();
        Ok(out.reshape([t, d]))
    }

    /// Per-input features [n, tokens, d] -> the image tokens in placeholder order [Σ tokens, d]: a reshape, or
    /// AnyRes's packing of each image's tiles (`check_images` has matched tiles and sizes).
    fn pack(&self, feats: Tensor<3>, sizes: &[[u32; 2]], alone: &[bool]) -> Tensor<2> {
        let [n, per, d] = feats.dims();
        let (Some(a), Some(nl)) = (&self.spec.anyres, &self.image_newline) else {
            return feats.reshape([n * per, d]);
        };
        let mut start = 0;
        let packed = sizes
            .iter()
            .zip(alone)
            .map(|(&[h, w], &one)| {
                let k = a.tiles(h, w, one);
                let f = feats.clone().slice([start..start + k, 0..per, 0..d]);
                start += k;
                a.pack(f, h, w, one, nl.val())
            })
            .collect();
        Tensor::cat(packed, 0)
    }

    /// pixels [n, c, s, s] -> projected image features [n, tokens, d_llm]
    /// `instructions`: each image's instruction, for a connector that reads one (InstructBLIP).
    pub fn image_features(
        &self,
        pixels: Tensor<4>,
        instructions: Option<&[Vec<i64>]>,
    ) -> Result<Tensor<3>> {
        if let Some(ins) = instructions
            && ins.len() != pixels.dims()[0]
        {
            return Err(Error::input(format!(
                "{} instructions for {} images: give one per image",
                ins.len(),
                pixels.dims()[0]
            )));
        }
        let f = self
            .vision_tower
            .features(pixels, &self.spec.select, &self.spec.vision)?;
        Ok(self.multi_modal_projector.forward_with(f, instructions))
    }

    /// Full forward: logits [b, t, vocab]. Positions are 0..t for every row, as transformers' forward without
    /// explicit `position_ids` (generation uses padding-aware positions, see `generate`); with M-RoPE and images,
    /// `get_rope_index`'s 3-D positions.
    pub fn forward(&self, input: &MmInput) -> Result<Tensor<3>> {
        let positions = self.positions(input)?;
        self.forward_with(input, &positions, None)
    }

    /// Positions of a whole-sequence forward: 0..t per row, or M-RoPE's 3-D positions when the batch has images.
    pub(crate) fn positions(&self, input: &MmInput) -> Result<Vec<Vec<i64>>> {
        if !input.segments.is_empty() {
            if self.spec.native.is_some() || self.spec.anyres.is_some() {
                return Err(Error::input(
                    "sequence packing (pack = true) takes models with a fixed number of tokens per image \
                     (LLaVA-1.5 layout); this one tiles images (AnyRes) or uses M-RoPE: set pack = false",
                ));
            }
            // each sample counts from 0 (transformers' packed `position_ids`)
            return Ok(input
                .segments
                .iter()
                .map(|row| {
                    let mut pos = Vec::with_capacity(row.len());
                    for (i, s) in row.iter().enumerate() {
                        let same = i > 0 && row[i - 1] == *s;
                        pos.push(if same { pos[i - 1] + 1 } else { 0 });
                    }
                    pos
                })
                .collect());
        }
        Ok(match self.mrope_positions(input)? {
            Some((p, _)) => p,
            None => {
                let t = input.ids[0].len();
                input.ids.iter().map(|_| (0..t as i64).collect()).collect()
            }
        })
    }

    /// transformers' `get_rope_index` for a batch with images or clips (`None` without M-RoPE or without them): 3·b rows
    /// of positions (all temporal rows, then row, then column; padding 0) and each row's delta for generation.
    pub fn mrope_positions(&self, input: &MmInput) -> Result<Option<(Vec<Vec<i64>>, Vec<i64>)>> {
        let Some(nr) = &self.spec.native else {
            return Ok(None);
        };
        let videos = input.videos();
        if input.image_sizes.is_empty() && input.image_grids.is_empty() && videos.is_none() {
            return Ok(None);
        }
        let mut grids = self.image_grids(nr, input)?.into_iter();
        let mut clips = videos
            .map(|(_, g, s)| {
                g.iter()
                    .zip(s)
                    .map(|(&g, &s)| (g, nr.time_interval(s)))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter();
        let vid = nr.video_token_id;
        let (b, t) = (input.ids.len(), input.ids[0].len());
        let mut axes = vec![vec![0i64; t]; 3 * b];
        let mut deltas = vec![];
        for (r, (ids, att)) in input.ids.iter().zip(&input.attention).enumerate() {
            let kinds: Vec<Kind> = ids
                .iter()
                .zip(att)
                .filter(|(_, a)| **a)
                .map(|(&x, _)| {
                    if x == self.spec.image_token_id {
                        Kind::Image
                    } else if Some(x) == vid {
                        Kind::Video
                    } else {
                        Kind::Text
                    }
                })
                .collect();
            let (pos, delta) = nr
                .rope_index(&kinds, &mut grids, &mut clips)
                .map_err(Error::input)?;
            let cols: Vec<usize> = (0..t).filter(|&j| att[j]).collect();
            for (a, p) in pos.iter().enumerate() {
                for (&j, &v) in cols.iter().zip(p) {
                    axes[a * b + r][j] = v;
                }
            }
            deltas.push(delta);
        }
        Ok(Some((axes, deltas)))
    }

    pub fn forward_with(
        &self,
        input: &MmInput,
        positions: &[Vec<i64>],
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        Ok(self
            .language_model
            .logits(self.hidden_with(input, positions, cache)?))
    }

    /// Final hidden states [b, t, d] with explicit positions (and a cache to fill): what `forward_with` puts the
    /// LM head on. Generation's prefill needs the head at the last position only (transformers'
    /// `logits_to_keep = 1`): at 200 image tokens the full [t, vocab] head is a third of the prefill.
    pub fn hidden_with(
        &self,
        input: &MmInput,
        positions: &[Vec<i64>],
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        let x = self.input_embeds(input)?;
        let segments = (!input.segments.is_empty()).then_some(input.segments.as_slice());
        Ok(self
            .language_model
            .forward_embeds(x, positions, &input.attention, segments, cache))
    }

    /// Final hidden states [b, t, d] (after the LLM's last norm) with positions 0..t: what heads on top of the
    /// LLM (a reward model's score, a value head) read.
    pub fn hidden(&self, input: &MmInput) -> Result<Tensor<3>> {
        self.hidden_with(input, &self.positions(input)?, None)
    }

    /// One decoding step over new ids [b, t_new] given the cache; `key_valid` covers past + new.
    pub fn step(
        &self,
        ids: Tensor<2, Int>,
        positions: &[Vec<i64>],
        key_valid: &[Vec<bool>],
        cache: &mut KvCache,
    ) -> Tensor<3> {
        let x = self.language_model.embed(ids);
        let h = self
            .language_model
            .forward_embeds(x, positions, key_valid, None, Some(cache));
        self.language_model.logits(h)
    }
}

/// Placeholders of `token` and native-resolution patches agree with the grids of the images or clips (`what`) they
/// stand for: each fills its grid's tokens (patches / merge²), and its patches are all there.
fn check_native(
    spec: &LlavaSpec,
    ids: &[Vec<i64>],
    token: i64,
    grids: &[[usize; 3]],
    n_patches: usize,
    what: &str,
) -> Result<()> {
    let Some(nr) = &spec.native else {
        return Err(Error::input(format!(
            "{what} patch grids were given for a model without native resolution"
        )));
    };
    let found = ids.iter().flatten().filter(|&&t| t == token).count();
    let want: usize = grids.iter().map(|&g| nr.grid_tokens(g)).sum();
    let patches: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    if found != want || patches != n_patches {
        return Err(Error::input(format!(
            "{what} placeholders and {what}s do not match: {found} placeholder tokens and {n_patches} patches for {} \
             {what}(s) whose grids {grids:?} need {want} tokens and {patches} patches (each {what} marker needs \
             exactly one {what}, expanded by its own size)",
            grids.len()
        )));
    }
    Ok(())
}

/// Each image's patch grid at native resolution, from its original (height, width).
fn grids(nr: &NativeRes, sizes: &[[u32; 2]]) -> Result<Vec<[usize; 3]>> {
    sizes
        .iter()
        .map(|&[h, w]| nr.grid(h, w))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::input)
}
