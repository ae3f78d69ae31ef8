//! LLaVA-NeXT's AnyRes, the survey's "patch division" route to high resolution (§2.1; transformers
//! `modeling_llava_next.py`, `LlavaNextProcessor`, `LlavaNextImageProcessor`): an image is resized to the
//! best-fitting resolution of a list of pinpoints (aspect ratio kept, the rest padded black), cut into tiles of the
//! encoder's input size and encoded tile by tile after a downscaled whole image (the base tile). The tiles' feature
//! grids are stitched into one grid, the rows or columns that only saw padding are cut off again ("unpad"), and a
//! learned `image_newline` ends every row. So the number of image tokens depends on each image's size:
//! `grid² + rows · (cols + 1)`.
//!
//! LLaVA-OneVision adds two rules (`modeling_llava_onevision.py`): `anyres_max_N` bilinearly downsamples an
//! unpadded grid holding more than about N tiles' worth of features, and an image that shares its sample with other
//! images is not tiled at all (one padded-square tile, then the newline).
//!
//! The geometry is plain integer/f64 arithmetic, written once here and shared by the image processor (tiles), the
//! text processor (placeholder counts) and the model (packing), so the three cannot disagree. Float comparisons and
//! roundings are transformers' own (`select_best_resolution`, `unpad_image`, `_get_unpadded_features`).
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::float_tensor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnyRes {
    /// Candidate resolutions as (height, width) in pixels, multiples of `tile` (`image_grid_pinpoints`).
    pub pinpoints: Vec<[u32; 2]>,
    /// Tile side in pixels: the encoder's input size.
    pub tile: u32,
    /// Feature grid side of one tile (tile / patch size).
    pub grid: u32,
    /// LLaVA-OneVision's `anyres_max_N` (`vision_aspect_ratio`): N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tiles: Option<u32>,
    /// LLaVA-OneVision: an image that shares its sample with other images is one padded-square tile, not tiled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single_tile_in_multi: bool,
}

/// Where the unpadded feature grid lies in the stitched one: rows `top..top + rows`, columns `left..left + cols`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unpadded {
    pub top: usize,
    pub rows: usize,
    pub left: usize,
    pub cols: usize,
}

/// Python's `int(round(x, 7))` for the non-negative values used here.
fn round7_trunc(x: f64) -> i64 {
    ((x * 1e7).round() / 1e7) as i64
}

impl AnyRes {
    pub fn validate(&self) -> Result<(), String> {
        if self.pinpoints.is_empty() {
            return Err("image_grid_pinpoints is empty: give at least one (height, width)".into());
        }
        if self.tile == 0 || self.grid == 0 {
            return Err(format!(
                "AnyRes tiles of {} px with a {}×{} feature grid: both must be positive",
                self.tile, self.grid, self.grid
            ));
        }
        for p in &self.pinpoints {
            if p[0] == 0 || p[1] == 0 || p[0] % self.tile != 0 || p[1] % self.tile != 0 {
                return Err(format!(
                    "image_grid_pinpoints entry {p:?} is not a positive multiple of the encoder's image size {}",
                    self.tile
                ));
            }
        }
        Ok(())
    }

    /// transformers' `select_best_resolution`: the pinpoint keeping the most of the image's pixels when scaled to
    /// fit, then the one wasting the fewest. `(h, w)` of the original image.
    pub fn best_resolution(&self, h: u32, w: u32) -> [u32; 2] {
        let (oh, ow) = (h as f64, w as f64);
        let mut best = self.pinpoints[0];
        let (mut max_eff, mut min_waste) = (0i64, i64::MAX);
        for &[ph, pw] in &self.pinpoints {
            let scale = (pw as f64 / ow).min(ph as f64 / oh);
            let (dw, dh) = ((ow * scale) as i64, (oh * scale) as i64);
            let eff = (dw * dh).min(w as i64 * h as i64);
            let waste = pw as i64 * ph as i64 - eff;
            if eff > max_eff || (eff == max_eff && waste < min_waste) {
                (max_eff, min_waste, best) = (eff, waste, [ph, pw]);
            }
        }
        best
    }

    /// Tiles of the best resolution as (rows, cols), the base tile not counted.
    pub fn tile_grid(&self, h: u32, w: u32) -> (usize, usize) {
        let [bh, bw] = self.best_resolution(h, w);
        (
            bh.div_ceil(self.tile) as usize,
            bw.div_ceil(self.tile) as usize,
        )
    }

    /// Whether an image is cut into tiles; `alone`: it is the only image of its sample.
    pub fn tiled(&self, alone: bool) -> bool {
        alone || !self.single_tile_in_multi
    }

    /// Encoder inputs for one image: the base tile and the grid's tiles (one tile when not tiled).
    pub fn tiles(&self, h: u32, w: u32, alone: bool) -> usize {
        if !self.tiled(alone) {
            return 1;
        }
        let (r, c) = self.tile_grid(h, w);
        1 + r * c
    }

    /// The part of the stitched feature grid that shows the image (transformers' `unpad_image`).
    pub fn unpadded(&self, h: u32, w: u32) -> Unpadded {
        let (r, c) = self.tile_grid(h, w);
        let g = self.grid as i64;
        let (ch, cw) = (r as i64 * g, c as i64 * g);
        let (oh, ow) = (h as f64, w as f64);
        if ow / oh > cw as f64 / ch as f64 {
            let new_h = round7_trunc(oh * (cw as f64 / ow));
            let pad = (ch - new_h).div_euclid(2).max(0);
            Unpadded {
                top: pad as usize,
                rows: (ch - 2 * pad).max(0) as usize,
                left: 0,
                cols: cw as usize,
            }
        } else {
            let new_w = round7_trunc(ow * (ch as f64 / oh));
            let pad = (cw - new_w).div_euclid(2).max(0);
            Unpadded {
                top: 0,
                rows: ch as usize,
                left: pad as usize,
                cols: (cw - 2 * pad).max(0) as usize,
            }
        }
    }

    /// The unpadded grid's (rows, cols) after `anyres_max_N` downsampling (transformers: `ratio > 1.1` ->
    /// bilinear to `(int(rows // ratio), int(cols // ratio))`); `None` when kept as it is.
    pub fn downsampled(&self, h: u32, w: u32) -> Option<(usize, usize)> {
        let m = self.max_tiles?;
        let u = self.unpadded(h, w);
        let g = self.grid as f64;
        let ratio = ((u.rows * u.cols) as f64 / (m as f64 * g * g)).sqrt();
        (ratio > 1.1).then(|| {
            (
                (u.rows as f64 / ratio).floor() as usize,
                (u.cols as f64 / ratio).floor() as usize,
            )
        })
    }

    /// Image tokens the LLM sees for an image of `(h, w)`: the base tile's grid, then each unpadded (and maybe
    /// downsampled) row + newline; an untiled image: its one tile + newline.
    pub fn tokens(&self, h: u32, w: u32, alone: bool) -> usize {
        let base = (self.grid * self.grid) as usize;
        if !self.tiled(alone) {
            return base + 1;
        }
        let u = self.unpadded(h, w);
        let (rows, cols) = self.downsampled(h, w).unwrap_or((u.rows, u.cols));
        base + rows * (cols + 1)
    }

    /// transformers' `pack_image_features` for one image: projected features of its tiles [tiles, grid², d]
    /// (base first) -> [tokens(h, w, alone), d].
    pub fn pack(
        &self,
        feats: Tensor<3>,
        h: u32,
        w: u32,
        alone: bool,
        newline: Tensor<1>,
    ) -> Tensor<2> {
        let [n, per, d] = feats.dims();
        let g = self.grid as usize;
        let base = feats.clone().slice([0..1, 0..per, 0..d]).reshape([per, d]);
        if !self.tiled(alone) {
            return Tensor::cat(vec![base, newline.reshape([1, d])], 0);
        }
        let (r, c) = self.tile_grid(h, w);
        debug_assert_eq!((n, per), (1 + r * c, g * g));
        // [r·c, g², d] -> [r, c, g, g, d] -> [r, g, c, g, d]: row-major over the stitched (r·g) × (c·g) grid
        let grid: Tensor<3> = feats
            .slice([1..n, 0..per, 0..d])
            .reshape([r, c, g, g, d])
            .swap_dims(1, 2)
            .reshape([r * g, c * g, d]);
        let u = self.unpadded(h, w);
        let mut kept = grid.slice([u.top..u.top + u.rows, u.left..u.left + u.cols, 0..d]);
        let (mut rows, mut cols) = (u.rows, u.cols);
        if let Some((r2, c2)) = self.downsampled(h, w) {
            kept = bilinear(kept, r2, c2);
            (rows, cols) = (r2, c2);
        }
        let nl = newline.reshape([1, 1, d]).expand([rows, 1, d]);
        let out = Tensor::cat(vec![kept, nl], 1).reshape([rows * (cols + 1), d]);
        Tensor::cat(vec![base, out], 0)
    }
}

/// One axis of PyTorch's `interpolate(mode="bilinear", align_corners=False)` as a matrix [out, in]: output i reads
/// input at `(i + 0.5)·in/out − 0.5` (clamped at 0), linearly between its two neighbours (f32, as the CPU kernel).
fn lerp_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let scale = n_in as f32 / n_out as f32;
    let mut m = vec![0f32; n_out * n_in];
    for i in 0..n_out {
        let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l1 = src - i0 as f32;
        m[i * n_in + i0] += 1.0 - l1;
        m[i * n_in + i1] += l1;
    }
    m
}

/// [h, w, d] -> [oh, ow, d], bilinear as above, as two matrix products (differentiable, no gather).
fn bilinear(x: Tensor<3>, oh: usize, ow: usize) -> Tensor<3> {
    let [h, w, d] = x.dims();
    let device = x.device();
    let mh: Tensor<2> = float_tensor(lerp_matrix(h, oh), [oh, h], &device);
    let mw: Tensor<2> = float_tensor(lerp_matrix(w, ow), [ow, w], &device);
    let y = mh.matmul(x.reshape([h, w * d])).reshape([oh, w, d]); // rows
    let y = y.swap_dims(0, 1).reshape([w, oh * d]);
    let y = mw.matmul(y).reshape([ow, oh, d]); // columns
    y.swap_dims(0, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next() -> AnyRes {
        // llava-v1.6's pinpoints at 336-px tiles (24×24 features)
        AnyRes {
            pinpoints: vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            tile: 336,
            grid: 24,
            max_tiles: None,
            single_tile_in_multi: false,
        }
    }

    #[test]
    fn counts_match_the_released_processor() {
        // LlavaNextProcessor's counts at 336-px tiles (transformers 5.23, `_get_number_of_features` − 1):
        // 480×640 -> 2340 (2 × 2 tiles, 48 rows unpadded to 36), 1000×1000 -> 2928, 300×1200 -> 1890.
        let a = next();
        assert_eq!(a.best_resolution(480, 640), [672, 672]);
        assert_eq!(a.tiles(480, 640, true), 5);
        assert_eq!(
            a.unpadded(480, 640),
            Unpadded {
                top: 6,
                rows: 36,
                left: 0,
                cols: 48
            }
        );
        assert_eq!(a.tokens(480, 640, true), 576 + 36 * 49);
        assert_eq!(a.tokens(1000, 1000, true), 576 + 48 * 49);
        assert_eq!(a.best_resolution(300, 1200), [336, 1008]);
        assert_eq!(a.tokens(300, 1200, true), 1890);
        assert!(a.validate().is_ok());
        let bad = AnyRes {
            pinpoints: vec![[300, 672]],
            ..next()
        };
        assert!(bad.validate().unwrap_err().contains("[300, 672]"));
    }
}
