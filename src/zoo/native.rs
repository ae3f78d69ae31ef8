//! Qwen2-VL's native dynamic resolution (transformers `Qwen2VLImageProcessor.smart_resize`, `get_rope_index`): an
//! image is resized to a multiple of patch × merge pixels with its aspect ratio kept and its pixel count inside
//! [min_pixels, max_pixels] (the memory control users tune), then cut into patches; every 2×2 block of patches
//! becomes one LLM token. Its tokens carry 3-D positions (temporal, row, column) for the LLM's M-RoPE; the text
//! after an image continues from the image's start + max(rows, cols).
//!
//! A video is its sampled frames (`VideoRes::sample`, transformers' `Qwen2VLVideoProcessor.sample_frames`) resized
//! with the video processor's own (smaller) budget, cut into temporal patches of `temporal` frames (the last frame
//! repeated to fill one); its tokens' temporal positions step by one per temporal patch (Qwen2-VL), or by the
//! seconds each patch spans × `tokens_per_second` (Qwen2.5-VL's absolute time alignment, `second_per_grid_ts`).
//!
//! As for AnyRes, the geometry is written once and shared by the image processor, the placeholder count and the
//! model's positions.
use serde::{Deserialize, Serialize};

use crate::zoo::sizing::Budget;

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
    /// How clips are sampled and sized (the checkpoint's video processor, or transformers' defaults).
    #[serde(default)]
    pub video: VideoRes,
}

/// Video sampling and sizing: `Qwen2VLVideoProcessor`'s settings (`video_preprocessor_config.json`) and Qwen2.5-VL's
/// `vision_config.tokens_per_second`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VideoRes {
    /// Per-frame pixel budget (the video processor's `size.shortest_edge` / `longest_edge`).
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// Frames sampled per second of the clip, kept within [min_frames, max_frames].
    pub fps: f64,
    pub min_frames: usize,
    pub max_frames: usize,
    /// Qwen2.5-VL: temporal M-RoPE positions advance by this many per second of video; `None` (Qwen2-VL): by one
    /// per temporal patch.
    pub tokens_per_second: Option<f64>,
    /// transformers' `cap_pixels_per_frame`: each frame also gets at most an even share of `max_video_tokens`
    /// tokens' worth of pixels (qwen-vl-utils' total bound), floored at 1.05 × min_pixels.
    pub cap_pixels_per_frame: bool,
    pub max_video_tokens: usize,
    /// The rate a clip's frames were recorded or extracted at (a data setting, `stages.NAME.data.frame_rate`);
    /// `None`: `fps`, so every frame is read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_rate: Option<f64>,
}

impl Default for VideoRes {
    /// transformers' `Qwen2VLVideoProcessor` defaults.
    fn default() -> Self {
        VideoRes {
            min_pixels: 128 * 28 * 28,
            max_pixels: 28 * 28 * 768,
            fps: 2.0,
            min_frames: 4,
            max_frames: 768,
            tokens_per_second: None,
            cap_pixels_per_frame: false,
            max_video_tokens: 128000,
            frame_rate: None,
        }
    }
}

/// A clip's frames as the model reads them: which of the source's frames, at what rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// Indices into the source's frames, in order.
    pub indices: Vec<usize>,
    /// Frames per second of the sampled clip (transformers' `VideoMetadata.sampled_fps`).
    pub fps: f64,
}

impl VideoRes {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_pixels < self.min_pixels {
            return Err(format!(
                "video_max_pixels: {} is below video_min_pixels {}: raise video_max_pixels or lower video_min_pixels",
                self.max_pixels, self.min_pixels
            ));
        }
        if !(self.fps > 0.0 && self.fps.is_finite()) {
            return Err(format!(
                "fps: {} must be a positive number of frames per second",
                self.fps
            ));
        }
        if let Some(r) = self.frame_rate
            && !(r > 0.0 && r.is_finite())
        {
            return Err(format!(
                "frame_rate: {r} must be a positive number of frames per second"
            ));
        }
        if self.max_frames == 0 || self.max_frames < self.min_frames {
            return Err(format!(
                "max_frames: {} must be positive and at least the video processor's min_frames {}",
                self.max_frames, self.min_frames
            ));
        }
        Ok(())
    }

    /// `Qwen2VLVideoProcessor.sample_frames` with `fps`: of `total` frames recorded at `frame_rate` per second,
    /// `total / frame_rate × fps` frames, clamped to [min_frames, max_frames] and to the clip, rounded down to
    /// whole temporal patches, spread evenly. A clip shorter than one temporal patch keeps all its frames (the
    /// last is repeated to fill the patch, as the processor pads).
    pub fn sample(
        &self,
        total: usize,
        frame_rate: f64,
        temporal: usize,
    ) -> Result<Sampled, String> {
        if total == 0 {
            return Err("the clip has no frames".into());
        }
        if !(frame_rate > 0.0 && frame_rate.is_finite()) {
            return Err(format!(
                "frame_rate {frame_rate} must be a positive number of frames per second"
            ));
        }
        let tp = temporal.max(1) as f64;
        let max = (self.max_frames.min(total) as f64 / tp).floor() * tp;
        let want = total as f64 / frame_rate * self.fps;
        let n = (want.max(self.min_frames as f64).min(max).min(total as f64) / tp).floor() * tp;
        let indices: Vec<usize> = if n < 1.0 {
            (0..total).collect()
        } else {
            // torch.arange(0, total, total / n).int(): the count is ceil(total / step), each value rounded
            // through f32 then truncated
            let step = total as f64 / n;
            let count = (total as f64 / step).ceil() as usize;
            (0..count)
                .map(|i| (i as f64 * step) as f32 as usize)
                .collect()
        };
        let fps = indices.len() as f64 / total as f64 * frame_rate;
        Ok(Sampled { indices, fps })
    }
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
        self.video.validate()?;
        let f = self.factor() as u64;
        if self.max_pixels < f * f {
            return Err(format!(
                "max_pixels {} is below one {f}×{f} block (patch × merge): raise it",
                self.max_pixels
            ));
        }
        Ok(())
    }

    /// The geometry under a recipe's budget (`model.*`, `stages.NAME.data.*` or one source's keys): each key set
    /// replaces the checkpoint's. Errors name the key (relative to where the budget was written).
    pub fn with_budget(&self, b: &Budget) -> Result<NativeRes, String> {
        let mut n = self.clone();
        if let Some(v) = b.min_pixels {
            n.min_pixels = v;
        }
        if let Some(v) = b.max_pixels {
            n.max_pixels = v;
        }
        let video = &mut n.video;
        if let Some(v) = b.video_min_pixels {
            video.min_pixels = v;
        }
        if let Some(v) = b.video_max_pixels {
            video.max_pixels = v;
        }
        if let Some(v) = b.fps {
            video.fps = v;
        }
        if let Some(v) = b.max_frames {
            video.max_frames = v;
            // a cap below the processor's floor lowers the floor too: the user asked for at most this many
            video.min_frames = video.min_frames.min(v);
        }
        if b.frame_rate.is_some() {
            video.frame_rate = b.frame_rate;
        }
        n.video.validate()?;
        n.validate()
            .map_err(|msg| format!("max_pixels / min_pixels: {msg}"))?;
        Ok(n)
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
        Ok(self.grid_tokens(self.grid(h, w)?))
    }

    /// LLM tokens of a patch grid (image or video).
    pub fn grid_tokens(&self, g: [usize; 3]) -> usize {
        g[0] * g[1] * g[2] / (self.merge * self.merge) as usize
    }

    /// The frame size of a clip of `frames` frames after the video processor's resize (its own pixel budget).
    pub fn video_resize(&self, frames: usize, h: u32, w: u32) -> Result<(u32, u32), String> {
        let v = &self.video;
        let mut max = v.max_pixels;
        if v.cap_pixels_per_frame && frames > 0 {
            let f = self.factor() as u64;
            let total = (v.max_video_tokens as f64 * (f * f) as f64 * 0.9) as u64;
            let share = total * self.temporal as u64 / frames as u64;
            max = max.min(share).max((v.min_pixels as f64 * 1.05) as u64);
        }
        NativeRes {
            min_pixels: v.min_pixels,
            max_pixels: max,
            ..self.clone()
        }
        .resize(h, w)
    }

    /// A clip's patch grid (`video_grid_thw`): `frames` sampled frames of original (height, width), padded to
    /// whole temporal patches.
    pub fn video_grid(&self, frames: usize, h: u32, w: u32) -> Result<[usize; 3], String> {
        if frames == 0 {
            return Err("the clip has no frames".into());
        }
        let (rh, rw) = self.video_resize(frames, h, w)?;
        let t = frames.div_ceil(self.temporal as usize);
        Ok([t, (rh / self.patch) as usize, (rw / self.patch) as usize])
    }

    /// Temporal M-RoPE step per temporal patch of a video whose patches span `seconds_per_grid` seconds each:
    /// Qwen2.5-VL's `tokens_per_second × second_per_grid_t`, Qwen2-VL's 1.
    pub fn time_interval(&self, seconds_per_grid: f64) -> f32 {
        match self.video.tokens_per_second {
            Some(tps) => (tps as f32) * (seconds_per_grid as f32),
            None => 1.0,
        }
    }

    /// `get_rope_index` for one row: `kinds[i]` for each real (unpadded) token (text, image or video
    /// placeholder), `images` the row's image grids and `videos` its video grids with each one's temporal step
    /// (`time_interval`), in order. Returns the (temporal, row, column) position of every token and the delta
    /// generation adds to later text positions (max position + 1 − tokens).
    pub fn rope_index(
        &self,
        kinds: &[Kind],
        images: &mut impl Iterator<Item = [usize; 3]>,
        videos: &mut impl Iterator<Item = ([usize; 3], f32)>,
    ) -> Result<([Vec<i64>; 3], i64), String> {
        let mut pos: [Vec<i64>; 3] = Default::default();
        let mut current = 0i64;
        let mut i = 0;
        let m = self.merge as usize;
        while i < kinds.len() {
            let start = i;
            while i < kinds.len() && kinds[i] == kinds[start] {
                i += 1;
            }
            let ([t, gh, gw], step) = match kinds[start] {
                Kind::Text => {
                    for k in 0..(i - start) as i64 {
                        for axis in &mut pos {
                            axis.push(current + k);
                        }
                    }
                    current += (i - start) as i64;
                    continue;
                }
                Kind::Image => (
                    images
                        .next()
                        .ok_or("more runs of image placeholders than images")?,
                    1.0,
                ),
                Kind::Video => videos
                    .next()
                    .ok_or("more runs of video placeholders than videos")?,
            };
            let (lh, lw) = (gh / m, gw / m);
            if t * lh * lw != i - start {
                return Err(format!(
                    "{} consecutive {} placeholders but its {t}×{gh}×{gw} patch grid gives {} tokens",
                    i - start,
                    if kinds[start] == Kind::Video {
                        "video"
                    } else {
                        "image"
                    },
                    t * lh * lw
                ));
            }
            for ti in 0..t {
                // (arange(t) * time_interval).long(), in f32 as torch computes it
                let tp = (ti as f32 * step) as i64;
                for hi in 0..lh {
                    for wi in 0..lw {
                        pos[0].push(current + tp);
                        pos[1].push(current + hi as i64);
                        pos[2].push(current + wi as i64);
                    }
                }
            }
            current += gh.max(gw) as i64 / m as i64;
        }
        let max = pos.iter().flatten().copied().max().unwrap_or(-1);
        let delta = max + 1 - kinds.len() as i64;
        Ok((pos, delta))
    }
}

/// The error for budget keys (`key`: where the recipe sets them) on a model that has no native resolution.
pub fn budget_needs_native(key: &str) -> String {
    format!(
        "{key}: min_pixels / max_pixels / video_min_pixels / video_max_pixels / fps / max_frames / frame_rate: only \
         a native-resolution model (Qwen2-VL) resizes images and samples clips by them; remove them"
    )
}

/// What a prompt token is, for M-RoPE (transformers' `mm_token_type_ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Image,
    Video,
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
            video: VideoRes::default(),
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

    #[test]
    fn capped_clip_frames_match_transformers() {
        // Qwen2VLVideoProcessor(patch 8, merge 2, 256..2048 px, cap_pixels_per_frame, max_video_tokens 10) on six
        // 56×40 frames: video_grid_thw [[3, 2, 4]] (without the cap [[3, 4, 8]])
        let mut q = NativeRes {
            patch: 8,
            merge: 2,
            temporal: 2,
            min_pixels: 256,
            max_pixels: 4096,
            vision_start_id: None,
            vision_end_id: None,
            video_token_id: None,
            video: VideoRes {
                min_pixels: 256,
                max_pixels: 2048,
                ..VideoRes::default()
            },
        };
        assert_eq!(q.video_grid(6, 40, 56).unwrap(), [3, 4, 8]);
        q.video.cap_pixels_per_frame = true;
        q.video.max_video_tokens = 10;
        assert_eq!(q.video_grid(6, 40, 56).unwrap(), [3, 2, 4]);
        // a one-frame clip fills one temporal patch
        assert_eq!(q.video.sample(1, 2.0, 2).unwrap().indices, vec![0]);
        assert!(q.video.sample(0, 2.0, 2).is_err());
    }
}
