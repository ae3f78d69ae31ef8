//! Qwen2-VL's native dynamic resolution (transformers `Qwen2VLImageProcessor.smart_resize`, `get_rope_index`): an
//! image is resized to a multiple of patch × merge pixels with its aspect ratio kept and its pixel count inside
//! [min_pixels, max_pixels] (the memory control users tune), then cut into patches; every 2×2 block of patches
//! becomes one LLM token. Its tokens carry 3-D positions (temporal, row, column) for the LLM's M-RoPE; the text
//! after an image continues from the image's start + max(rows, cols).
//!
//! As for AnyRes, the geometry is written once and shared by the image processor, the placeholder count and the
//! model's positions.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NativeRes {
    pub patch: u32,
    pub merge: u32,
    /// Frames per temporal patch (a still image is repeated to fill it).
    pub temporal: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// The tokens that wrap an image's placeholders in the prompt (`<|vision_start|>`, `<|vision_end|>`) and the
    /// video placeholder, as the checkpoint's config names them.
    #[serde(default)]
    pub vision_start_id: Option<i64>,
    #[serde(default)]
    pub vision_end_id: Option<i64>,
    #[serde(default)]
    pub video_token_id: Option<i64>,
}

impl NativeRes {
    pub fn factor(&self) -> u32 {
        self.patch * self.merge
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.patch == 0 || self.merge == 0 || self.temporal == 0 {
            return Err("patch_size, merge_size and temporal_patch_size must be positive".into());
        }
        if self.max_pixels < self.min_pixels {
            return Err(format!(
                "max_pixels {} is below min_pixels {}: raise max_pixels or lower min_pixels",
                self.max_pixels, self.min_pixels
            ));
        }
        let f = self.factor() as u64;
        if self.max_pixels < f * f {
            return Err(format!(
                "max_pixels {} is below one {f}×{f} block (patch × merge): raise it",
                self.max_pixels
            ));
        }
        Ok(())
    }

    /// transformers' `smart_resize`: (height, width) multiples of patch × merge, aspect kept, pixels within bounds.
    pub fn resize(&self, h: u32, w: u32) -> Result<(u32, u32), String> {
        if h == 0 || w == 0 {
            return Err(format!("the image is {w}x{h} pixels: nothing to encode"));
        }
        let (hf, wf, f) = (h as f64, w as f64, self.factor() as f64);
        if hf.max(wf) / hf.min(wf) > 200.0 {
            return Err(format!(
                "the image is {w}x{h} pixels: an aspect ratio above 200 cannot be resized to patches (crop it)"
            ));
        }
        let mut hb = (hf / f).round_ties_even() * f;
        let mut wb = (wf / f).round_ties_even() * f;
        if hb * wb > self.max_pixels as f64 {
            let beta = (hf * wf / self.max_pixels as f64).sqrt();
            hb = f.max((hf / beta / f).floor() * f);
            wb = f.max((wf / beta / f).floor() * f);
        } else if hb * wb < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (hf * wf)).sqrt();
            hb = (hf * beta / f).ceil() * f;
            wb = (wf * beta / f).ceil() * f;
        }
        if hb < f || wb < f {
            return Err(format!(
                "the image is {w}x{h} pixels and resizes to {wb}x{hb}, less than one {f}×{f} block: raise min_pixels"
            ));
        }
        Ok((hb as u32, wb as u32))
    }

    /// The image's patch grid (frames, rows, cols), as `image_grid_thw`.
    pub fn grid(&self, h: u32, w: u32) -> Result<[usize; 3], String> {
        let (rh, rw) = self.resize(h, w)?;
        Ok([1, (rh / self.patch) as usize, (rw / self.patch) as usize])
    }

    /// LLM tokens for the image: patches / merge².
    pub fn tokens(&self, h: u32, w: u32) -> Result<usize, String> {
        let g = self.grid(h, w)?;
        Ok(g[0] * g[1] * g[2] / (self.merge * self.merge) as usize)
    }

    /// `get_rope_index` for one row: `is_image[i]` for each real (unpadded) token, `grids` the row's images in
    /// order. Returns the (temporal, row, column) position of every token and the delta generation adds to later
    /// text positions (max position + 1 − tokens).
    pub fn rope_index(
        &self,
        is_image: &[bool],
        grids: &mut impl Iterator<Item = [usize; 3]>,
    ) -> Result<([Vec<i64>; 3], i64), String> {
        let mut pos: [Vec<i64>; 3] = Default::default();
        let mut current = 0i64;
        let mut i = 0;
        let m = self.merge as usize;
        while i < is_image.len() {
            let start = i;
            while i < is_image.len() && is_image[i] == is_image[start] {
                i += 1;
            }
            if !is_image[start] {
                for k in 0..(i - start) as i64 {
                    for axis in &mut pos {
                        axis.push(current + k);
                    }
                }
                current += (i - start) as i64;
                continue;
            }
            let [t, gh, gw] = grids
                .next()
                .ok_or("more runs of image placeholders than images")?;
            let (lh, lw) = (gh / m, gw / m);
            if t * lh * lw != i - start {
                return Err(format!(
                    "{} consecutive image placeholders but the image's {t}×{gh}×{gw} patch grid gives {} tokens",
                    i - start,
                    t * lh * lw
                ));
            }
            for ti in 0..t {
                for hi in 0..lh {
                    for wi in 0..lw {
                        pos[0].push(current + ti as i64);
                        pos[1].push(current + hi as i64);
                        pos[2].push(current + wi as i64);
                    }
                }
            }
            current += gh.max(gw) as i64 / m as i64;
        }
        let max = pos.iter().flatten().copied().max().unwrap_or(-1);
        let delta = max + 1 - is_image.len() as i64;
        Ok((pos, delta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers() {
        // Qwen2-VL's released processor: 14-px patches, merge 2, 56² .. 28²·1280 pixels
        let q = NativeRes {
            patch: 14,
            merge: 2,
            temporal: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            vision_start_id: None,
            vision_end_id: None,
            video_token_id: None,
        };
        // smart_resize(480, 640) = (476, 644); (1080, 1920) is over budget -> (728, 1316)
        assert_eq!(q.resize(480, 640).unwrap(), (476, 644));
        assert_eq!(q.resize(1080, 1920).unwrap(), (728, 1316));
        assert_eq!(q.tokens(480, 640).unwrap(), 34 * 46 / 4);
        assert!(q.resize(10, 3000).unwrap_err().contains("aspect ratio"));
        // an image smaller than one patch block is resized up to min_pixels (as transformers does: 4×6 -> 56×84);
        // with no floor it would round to nothing: a located error, not an empty grid (transformers fails later)
        assert_eq!(q.grid(4, 6).unwrap(), [1, 4, 6]);
        let tiny = NativeRes {
            min_pixels: 0,
            ..q.clone()
        };
        assert!(tiny.resize(4, 6).unwrap_err().contains("raise min_pixels"));
        let bad = NativeRes {
            max_pixels: 100,
            ..q
        };
        assert!(bad.validate().unwrap_err().contains("below min_pixels"));
    }
}
