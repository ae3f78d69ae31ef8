//! Image preprocessing as transformers' CLIP/SigLIP image processors do it: (LLaVA's pad-to-square with the mean
//! colour), resize (shortest edge, or to a fixed size) with the configured filter, center crop, rescale by 1/255,
//! normalize by mean/std, channels first. The image crate's CatmullRom is within ≈0.05 of PIL's bicubic.
//! With AnyRes (LLaVA-NeXT, `zoo::anyres`) one image becomes several tiles, as `LlavaNextImageProcessor` cuts them:
//! the whole image squashed to one tile, then the tiles of its best-fit resolution (aspect kept, padded black).
use burn::tensor::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use serde_json::Value;
use std::path::Path;

use crate::error::{Error, Result, read_json};
use crate::zoo::anyres::AnyRes;
use crate::zoo::layers::float_tensor;
use crate::zoo::mllm::LlavaSpec;
use crate::zoo::native::NativeRes;
use crate::zoo::sizing::Sizing;

#[derive(Debug, Clone, PartialEq)]
pub enum Resize {
    ShortestEdge(u32),
    Exact { height: u32, width: u32 },
}

#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub resize: Option<Resize>,
    pub filter: FilterType,
    pub crop: Option<(u32, u32)>,
    pub rescale: Option<f32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub normalize: bool,
    /// LLaVA-1.5's `image_aspect_ratio = "pad"`: pad to a square with the mean colour before resizing.
    pub pad_to_square: bool,
    /// The other towers of a fused encoder, each with its own preprocessing: their channels follow this one's
    /// ([3·(1 + also.len()), h, w]); all must produce the same size.
    pub also: Vec<ImageProcessor>,
    /// The model's sizing (the model, the placeholder count and the processor read one geometry): AnyRes gives
    /// `tiles(h, w, alone)` tiles of [3, tile, tile]; native resolution the image's patches in the processor's
    /// order as [patches, 3·frames, p, p] (channel c·frames + frame).
    pub sizing: Option<Sizing>,
}

fn f32s(v: Option<&Value>, default: [f32; 3]) -> [f32; 3] {
    match v.and_then(|x| x.as_array()) {
        Some(a) if a.len() == 3 => [0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32),
        _ => match v.and_then(|x| x.as_f64()) {
            Some(s) => [s as f32; 3],
            None => default,
        },
    }
}

impl ImageProcessor {
    /// From `preprocessor_config.json`, or the `image_processor` entry of a 5.x `processor_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        let (path, v) = if pre.exists() {
            let v: Value = read_json(&pre)?;
            (pre, v)
        } else {
            let p = dir.join("processor_config.json");
            if !p.exists() {
                return Err(Error::file(
                    dir,
                    "no preprocessor_config.json or processor_config.json: cannot preprocess images for this checkpoint",
                ));
            }
            let v: Value = read_json(&p)?;
            let ip = v
                .get("image_processor")
                .cloned()
                .ok_or_else(|| Error::key(&p, "image_processor", "missing"))?;
            (p, ip)
        };
        Self::from_hf(&v, &path)
    }

    pub fn from_hf(v: &Value, path: &Path) -> Result<Self> {
        if v.get("image_processor_type").and_then(Value::as_str)
            == Some("MituneFusedImageProcessor")
        {
            let towers = v.get("towers").and_then(Value::as_array).ok_or_else(|| {
                Error::key(path, "towers", "missing: one image processor per tower")
            })?;
            let mut all = towers
                .iter()
                .map(|t| Self::from_hf(t, path))
                .collect::<Result<Vec<_>>>()?;
            if all.is_empty() {
                return Err(Error::key(path, "towers", "empty"));
            }
            let mut first = all.remove(0);
            first.also = all;
            return Ok(first);
        }
        let flag = |k: &str, d: bool| v.get(k).and_then(|x| x.as_bool()).unwrap_or(d);
        let dim = |o: &Value, k: &str| o.get(k).and_then(|x| x.as_u64()).map(|x| x as u32);
        let resize = if flag("do_resize", true) {
            let size = v
                .get("size")
                .ok_or_else(|| Error::key(path, "size", "missing while do_resize is true"))?;
            if let Some(s) = dim(size, "shortest_edge") {
                Some(Resize::ShortestEdge(s))
            } else if let (Some(height), Some(width)) = (dim(size, "height"), dim(size, "width")) {
                Some(Resize::Exact { height, width })
            } else if let Some(s) = size.as_u64() {
                Some(Resize::Exact {
                    height: s as u32,
                    width: s as u32,
                })
            } else {
                return Err(Error::key(
                    path,
                    "size",
                    format!("unsupported size {size} (shortest_edge, or height and width)"),
                ));
            }
        } else {
            None
        };
        let filter = match v.get("resample").and_then(|r| r.as_u64()).unwrap_or(3) {
            0 => FilterType::Nearest,
            1 => FilterType::Lanczos3,
            2 => FilterType::Triangle,
            3 => FilterType::CatmullRom,
            other => {
                return Err(Error::key(
                    path,
                    "resample",
                    format!("unsupported PIL resample filter {other}"),
                ));
            }
        };
        let crop = if flag("do_center_crop", false) {
            let c = v.get("crop_size").ok_or_else(|| {
                Error::key(path, "crop_size", "missing while do_center_crop is true")
            })?;
            match (dim(c, "height"), dim(c, "width"), c.as_u64()) {
                (Some(h), Some(w), _) => Some((h, w)),
                (_, _, Some(s)) => Some((s as u32, s as u32)),
                _ => {
                    return Err(Error::key(
                        path,
                        "crop_size",
                        format!("unsupported crop size {c}"),
                    ));
                }
            }
        } else {
            None
        };
        Ok(ImageProcessor {
            resize,
            filter,
            crop,
            rescale: flag("do_rescale", true).then(|| {
                v.get("rescale_factor")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(1.0 / 255.0) as f32
            }),
            mean: f32s(v.get("image_mean"), [0.5; 3]),
            std: f32s(v.get("image_std"), [0.5; 3]),
            normalize: flag("do_normalize", true),
            pad_to_square: false,
            also: vec![],
            sizing: None,
        })
    }

    /// Channels of `preprocess`'s output: 3 per tower (3 per frame of a native-resolution patch).
    pub fn channels(&self) -> usize {
        if let Some(Sizing::Native(n)) = &self.sizing {
            return 3 * n.temporal as usize;
        }
        3 * (1 + self.also.len())
    }

    /// Takes the model's image geometry (AnyRes tiles, native-resolution patches): the processor, the placeholder
    /// count and the model read one.
    pub fn configure(&mut self, spec: &LlavaSpec) {
        self.sizing = spec.sizing();
    }

    /// LLaVA's pad-to-square for every tower.
    pub fn set_pad_to_square(&mut self, on: bool) {
        self.pad_to_square = on;
        for t in &mut self.also {
            t.pad_to_square = on;
        }
    }

    /// Output (height, width) of `preprocess`.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        let (h, w) = self.resized(w, h);
        self.crop.unwrap_or((h, w))
    }

    fn resized(&self, w: u32, h: u32) -> (u32, u32) {
        match &self.resize {
            None => (h, w),
            Some(Resize::Exact { height, width }) => (*height, *width),
            // transformers' get_resize_output_image_size(default_to_square=False)
            Some(Resize::ShortestEdge(s)) => {
                if w <= h {
                    ((*s as u64 * h as u64 / w as u64) as u32, *s)
                } else {
                    (*s, (*s as u64 * w as u64 / h as u64) as u32)
                }
            }
        }
    }

    /// An RGB image -> [channels, h, w] values, channels first (a fused encoder's towers' 3 channels in turn);
    /// with AnyRes, [tiles, 3, h, w] (`len / (channels·h·w)` tiles). Towers whose processors give this image
    /// different sizes cannot share one tensor: an error, not a guess.
    pub fn preprocess(
        &self,
        img: &DynamicImage,
    ) -> std::result::Result<(Vec<f32>, u32, u32), String> {
        self.preprocess_in(img, true)
    }

    /// `preprocess` for an image that is (`alone`) or is not the only image of its sample: LLaVA-OneVision tiles
    /// only lone images, and pads the others to a square of the mean colour (one tile).
    pub fn preprocess_in(
        &self,
        img: &DynamicImage,
        alone: bool,
    ) -> std::result::Result<(Vec<f32>, u32, u32), String> {
        match &self.sizing {
            Some(Sizing::Native(n)) => return self.patches(img, n),
            Some(Sizing::AnyRes(a)) if a.tiled(alone) => return self.tiles(img, a),
            Some(Sizing::AnyRes(_)) => {
                let mut square = self.clone();
                square.set_pad_to_square(true);
                return Ok(square.preprocess_one(img));
            }
            None => {}
        }
        let (mut out, h, w) = self.preprocess_one(img);
        for (i, t) in self.also.iter().enumerate() {
            let (v, th, tw) = t.preprocess_one(img);
            if (th, tw) != (h, w) {
                return Err(format!(
                    "the fused encoder's tower {} preprocesses this image to {th}x{tw} and tower 0 to {h}x{w}: give \
                     the towers' processors one output size (a fixed resize or crop)",
                    i + 1
                ));
            }
            out.extend(v);
        }
        Ok((out, h, w))
    }

    /// `LlavaNextImageProcessor.get_image_patches` then each tile through the usual steps.
    fn tiles(
        &self,
        img: &DynamicImage,
        a: &AnyRes,
    ) -> std::result::Result<(Vec<f32>, u32, u32), String> {
        if !self.also.is_empty() {
            return Err("AnyRes tiling with a fused encoder is not supported".into());
        }
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        if w == 0 || h == 0 {
            return Err(format!("the image is {w}x{h} pixels: nothing to encode"));
        }
        let [th, tw] = a.best_resolution(h, w);
        // transformers' get_patch_output_size: fit inside (th, tw), the other side rounded up
        let (sw, sh) = (tw as f64 / w as f64, th as f64 / h as f64);
        let (nh, nw) = if sw < sh {
            (((h as f64 * sw).ceil() as u32).min(th), tw)
        } else {
            (th, ((w as f64 * sh).ceil() as u32).min(tw))
        };
        let resized = image::imageops::resize(&rgb, nw.max(1), nh.max(1), self.filter);
        let mut canvas = RgbImage::new(tw, th); // black, as np.pad(constant_values=0)
        image::imageops::overlay(
            &mut canvas,
            &resized,
            ((tw - nw) / 2) as i64,
            ((th - nh) / 2) as i64,
        );
        let (bh, bw) = match &self.resize {
            Some(Resize::ShortestEdge(s)) => (*s, *s),
            Some(Resize::Exact { height, width }) => (*height, *width),
            None => (a.tile, a.tile),
        };
        let mut tiles = vec![image::imageops::resize(&rgb, bw, bh, self.filter)];
        for y in (0..th).step_by(a.tile as usize) {
            for x in (0..tw).step_by(a.tile as usize) {
                tiles.push(image::imageops::crop_imm(&canvas, x, y, a.tile, a.tile).to_image());
            }
        }
        let mut out = vec![];
        let mut size = None;
        for t in tiles {
            let (v, h, w) = self.preprocess_one(&DynamicImage::ImageRgb8(t));
            if *size.get_or_insert((h, w)) != (h, w) {
                return Err(format!(
                    "AnyRes tiles preprocess to {h}x{w} and {:?}: the processor's size and crop must equal the tile",
                    size.unwrap()
                ));
            }
            out.extend(v);
        }
        let (h, w) = size.unwrap_or((a.tile, a.tile));
        Ok((out, h, w))
    }

    /// `Qwen2VLImageProcessor`: smart resize (bicubic), rescale, normalize, then the patches of each merge block in
    /// turn, each [3 channels × frames (the still image repeated) × p × p].
    fn patches(
        &self,
        img: &DynamicImage,
        n: &NativeRes,
    ) -> std::result::Result<(Vec<f32>, u32, u32), String> {
        let (rh, rw) = n.resize(img.height(), img.width())?;
        self.patches_at(img, n, rh, rw)
    }

    /// `patches` at a grid fixed beforehand (by the image's data source's own pixel budget).
    pub fn patches_for(
        &self,
        img: &DynamicImage,
        grid: [usize; 3],
    ) -> std::result::Result<(Vec<f32>, u32, u32), String> {
        let Some(Sizing::Native(n)) = &self.sizing else {
            return Err("a patch grid was given for a model without native resolution".into());
        };
        let p = n.patch as usize;
        self.patches_at(img, n, (grid[1] * p) as u32, (grid[2] * p) as u32)
    }

    fn patches_at(
        &self,
        img: &DynamicImage,
        n: &NativeRes,
        rh: u32,
        rw: u32,
    ) -> std::result::Result<(Vec<f32>, u32, u32), String> {
        let mut rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        if (rh, rw) != (h, w) {
            rgb = image::imageops::resize(&rgb, rw, rh, self.filter);
        }
        let plane = self.normalized(&rgb); // [3, rh, rw]
        Ok((patchify(&[plane], rh, rw, n), n.patch, n.patch))
    }

    /// `Qwen2VLVideoProcessor`: a clip's sampled frames (one size) resized into the video pixel budget, rescaled,
    /// normalized, padded to whole temporal patches with the last frame, then cut as `patches` cuts an image, one
    /// temporal patch after another: [patches, 3·temporal, p, p] values and the clip's grid (`video_grid_thw`).
    pub fn video_patches(
        &self,
        frames: &[DynamicImage],
    ) -> std::result::Result<(Vec<f32>, [usize; 3]), String> {
        let Some(Sizing::Native(n)) = &self.sizing else {
            return Err(
                "this model does not read videos (only Qwen2-VL / Qwen2.5-VL checkpoints do)"
                    .into(),
            );
        };
        let first = frames.first().ok_or("the clip has no frames")?;
        let (w, h) = (first.width(), first.height());
        let (rh, rw) = n.video_resize(frames.len(), h, w)?;
        let mut planes = Vec::with_capacity(frames.len());
        for (i, f) in frames.iter().enumerate() {
            if (f.width(), f.height()) != (w, h) {
                return Err(format!(
                    "frame {i} is {}x{} pixels but the clip's first frame is {w}x{h}: a clip's frames share one size",
                    f.width(),
                    f.height()
                ));
            }
            let mut rgb = f.to_rgb8();
            if (rh, rw) != (h, w) {
                rgb = image::imageops::resize(&rgb, rw, rh, self.filter);
            }
            planes.push(self.normalized(&rgb));
        }
        let grid = n.video_grid(frames.len(), h, w)?;
        Ok((patchify(&planes, rh, rw, n), grid))
    }

    /// Rescale and normalize an RGB image into [3, h, w] values.
    fn normalized(&self, rgb: &RgbImage) -> Vec<f32> {
        let (w, h) = rgb.dimensions();
        let mut out = vec![0f32; 3 * (w * h) as usize];
        for (x, y, p) in rgb.enumerate_pixels() {
            for c in 0..3 {
                let mut v = p[c] as f32;
                if let Some(r) = self.rescale {
                    v *= r;
                }
                if self.normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                out[c * (w * h) as usize + (y * w + x) as usize] = v;
            }
        }
        out
    }

    fn preprocess_one(&self, img: &DynamicImage) -> (Vec<f32>, u32, u32) {
        let mut rgb: RgbImage = img.to_rgb8();
        if self.pad_to_square {
            rgb = expand_to_square(&rgb, self.mean);
        }
        let (w, h) = rgb.dimensions();
        let (nh, nw) = self.resized(w, h);
        if (nh, nw) != (h, w) {
            rgb = image::imageops::resize(&rgb, nw, nh, self.filter);
        }
        if let Some((ch, cw)) = self.crop {
            let (w, h) = rgb.dimensions();
            let top = h.saturating_sub(ch) / 2;
            let left = w.saturating_sub(cw) / 2;
            rgb = image::imageops::crop_imm(&rgb, left, top, cw.min(w), ch.min(h)).to_image();
        }
        let (w, h) = rgb.dimensions();
        (self.normalized(&rgb), h, w)
    }

    /// Each image's (height, width) as stored, read from the file's header: what AnyRes tiles and counts by.
    pub fn sizes(paths: &[impl AsRef<Path>]) -> Result<Vec<[u32; 2]>> {
        paths
            .iter()
            .map(|p| {
                let p = p.as_ref();
                image::image_dimensions(p)
                    .map(|(w, h)| [h, w])
                    .map_err(|e| Error::file(p, format!("cannot read the image's size: {e}")))
            })
            .collect()
    }

    /// Loads and preprocesses image files into one batch [n, 3, h, w] (AnyRes: every image's tiles in turn);
    /// all must come out the same size.
    pub fn batch(&self, paths: &[impl AsRef<Path>], device: &Device) -> Result<Option<Tensor<4>>> {
        Ok(self.batch_sized(paths, device)?.0)
    }

    /// `batch`, and each image's original (height, width) from the decoded image (what a sized model needs beside
    /// the pixels; no second read of the file).
    pub fn batch_sized(
        &self,
        paths: &[impl AsRef<Path>],
        device: &Device,
    ) -> Result<(Option<Tensor<4>>, Vec<[u32; 2]>)> {
        if paths.is_empty() {
            return Ok((None, vec![]));
        }
        let mut all = vec![];
        let mut size = None;
        let mut sizes = vec![];
        let alone = paths.len() == 1; // one call is one sample's images
        for p in paths {
            let img = load_image(p.as_ref())?;
            sizes.push([img.height(), img.width()]);
            let (v, h, w) = self
                .preprocess_in(&img, alone)
                .map_err(|m| Error::file(p.as_ref(), m))?;
            if *size.get_or_insert((h, w)) != (h, w) {
                return Err(Error::file(
                    p.as_ref(),
                    format!(
                        "preprocesses to {h}x{w}, other images to {:?}; set a fixed crop/resize",
                        size.unwrap()
                    ),
                ));
            }
            all.extend(v);
        }
        let (h, w) = size.unwrap();
        let n = all.len() / (self.channels() * (h * w) as usize);
        let pixels = float_tensor(all, [n, self.channels(), h as usize, w as usize], device);
        Ok((Some(pixels), sizes))
    }
}

/// Frames [3, rh, rw] (normalized) -> patches in the Qwen2-VL processors' order: per temporal patch (the last frame
/// repeated to fill one), per merge block, per patch of the block, [3 channels × temporal frames × p × p].
fn patchify(frames: &[Vec<f32>], rh: u32, rw: u32, n: &NativeRes) -> Vec<f32> {
    let (p, m, t) = (n.patch as usize, n.merge as usize, n.temporal as usize);
    let (gh, gw, rw) = (rh as usize / p, rw as usize / p, rw as usize);
    let hw = rh as usize * rw;
    let gt = frames.len().div_ceil(t);
    let mut out = Vec::with_capacity(3 * t * hw * gt);
    let frame = |k: usize| &frames[k.min(frames.len() - 1)];
    for ti in 0..gt {
        for bi in 0..gh / m {
            for bj in 0..gw / m {
                for mi in 0..m {
                    for mj in 0..m {
                        let (y0, x0) = ((bi * m + mi) * p, (bj * m + mj) * p);
                        for c in 0..3 {
                            for f in 0..t {
                                let plane = frame(ti * t + f);
                                for y in y0..y0 + p {
                                    let row = c * hw + y * rw;
                                    out.extend_from_slice(&plane[row + x0..row + x0 + p]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// LLaVA's expand2square: centre the image on a square canvas filled with the mean colour (as 0..255 ints).
fn expand_to_square(img: &RgbImage, mean: [f32; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let s = w.max(h);
    let bg = image::Rgb(mean.map(|m| (m * 255.0) as u8));
    let mut canvas = RgbImage::from_pixel(s, s, bg);
    image::imageops::overlay(&mut canvas, img, ((s - w) / 2) as i64, ((s - h) / 2) as i64);
    canvas
}

pub fn load_image(path: &Path) -> Result<DynamicImage> {
    image::open(path).map_err(|e| match e {
        image::ImageError::IoError(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        other => Error::file(
            path,
            format!("cannot decode image: {other} (PNG and JPEG are supported)"),
        ),
    })
}
