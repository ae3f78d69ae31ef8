//! Batches: the order of an epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches
//! an uninterrupted run would. Global batches hold one modality where possible (LLaVA's `group_by_modality_length`)
//! and are sorted by length inside, so micro-batches carry little padding. Images are decoded and preprocessed in
//! parallel (rayon) on a background thread a few steps ahead of compute; so are clips' frames.
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use rayon::prelude::*;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use super::images::{ImageProcessor, load_image};
use super::templates::Encoded;
use crate::recipe::schema::Mix;
use crate::zoo::sizing::Sizing;

/// One micro-batch, padded on the right (positions 0..t, as transformers' training forward).
pub struct MicroBatch {
    /// [b][t]
    pub ids: Vec<Vec<i64>>,
    pub attention: Vec<Vec<bool>>,
    pub labels: Vec<Vec<bool>>,
    /// [n_images, 3, s, s] flattened (AnyRes: [n_tiles, …], each image's tiles in turn), in placeholder order;
    /// `Err` names the image that failed to load.
    pub pixels: Result<Option<(Vec<f32>, [usize; 4])>, String>,
    /// Each image's original (height, width), in placeholder order.
    pub image_sizes: Vec<[u32; 2]>,
    /// Images of each sample (row).
    pub images_per_row: Vec<usize>,
    /// Native resolution: each image's patch grid as its source's budget fixed it (empty otherwise).
    pub image_grids: Vec<[usize; 3]>,
    /// One instruction per image, in placeholder order, for a connector that reads one (empty otherwise).
    pub instructions: Vec<Vec<i64>>,
    /// Every clip's patches in turn, [patches, 3·temporal, p, p] flattened, in video-placeholder order; `Err`
    /// names the frame that failed to load.
    pub videos: Result<Option<(Vec<f32>, [usize; 4])>, String>,
    /// Each clip's grid and seconds per temporal patch, in order.
    pub video_grids: Vec<[usize; 3]>,
    pub video_seconds: Vec<f64>,
    /// Samples left out because their media failed to decode: (index of the encoded sample, reason).
    pub dropped: Vec<(usize, String)>,
    /// Tokens incl. image placeholders and padding (what the model computes on).
    pub tokens: usize,
    pub supervised: usize,
}

/// Per-epoch sample sets of each source: `(source, weight)` per encoded sample.
pub struct Order {
    pub mix: Mix,
    pub global: usize,
    pub seed: u64,
    /// Encoded-sample indices grouped by source, with each source's weight.
    pub sources: Vec<(Vec<usize>, f64)>,
    /// Whether a sample has images (for modality grouping) and its length.
    pub has_image: Vec<bool>,
    pub len: Vec<usize>,
}

impl Order {
    /// Global batches of epoch `epoch`, each a list of sample indices (longest first).
    pub fn epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut rng =
            StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        let mut drawn: Vec<Vec<usize>> = vec![];
        for (idx, w) in &self.sources {
            let mut pool = idx.clone();
            pool.shuffle(&mut rng);
            let k = (w * pool.len() as f64).round() as usize;
            drawn.push((0..k).map(|i| pool[i % pool.len().max(1)]).collect());
        }
        let mut chunks = match self.mix {
            Mix::Mixed => {
                let mut all: Vec<usize> = drawn.concat();
                all.shuffle(&mut rng);
                let mut c = self.chunk(&all);
                c.shuffle(&mut rng);
                c
            }
            Mix::Sequential => drawn
                .iter()
                .flat_map(|d| {
                    let mut c = self.chunk(d);
                    c.shuffle(&mut rng);
                    c
                })
                .collect(),
        };
        for c in &mut chunks {
            c.sort_by_key(|&i| std::cmp::Reverse(self.len[i]));
        }
        chunks
    }

    /// Same-modality chunks of `global`; leftovers of both modalities fill mixed chunks; a last partial one is
    /// dropped so every step has the same batch size.
    fn chunk(&self, order: &[usize]) -> Vec<Vec<usize>> {
        let (mm, text): (Vec<usize>, Vec<usize>) = order.iter().partition(|&&i| self.has_image[i]);
        let mut out = vec![];
        let mut rest = vec![];
        for pool in [mm, text] {
            let full = pool.len() / self.global * self.global;
            out.extend(pool[..full].chunks(self.global).map(<[usize]>::to_vec));
            rest.extend_from_slice(&pool[full..]);
        }
        let full = rest.len() / self.global * self.global;
        out.extend(rest[..full].chunks(self.global).map(<[usize]>::to_vec));
        out
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.epoch(0).len()
    }
}

/// One sample's decoded media: each image's values with its preprocessed (h, w) and original (h, w), each
/// clip's patches.
struct Decoded {
    images: Vec<(Vec<f32>, u32, u32, [u32; 2])>,
    clips: Vec<Vec<f32>>,
}

/// Decodes and preprocesses one sample's images and clips; the error names the file.
fn decode(s: &Encoded, images: &ImageProcessor) -> Result<Decoded, String> {
    // LLaVA-OneVision tiles an image only when it is its sample's only one; at native resolution each image takes
    // the grid its source's budget fixed
    let alone = s.images.len() == 1;
    let mut out = Decoded {
        images: vec![],
        clips: vec![],
    };
    for (k, p) in s.images.iter().enumerate() {
        let img = load_image(p).map_err(|e| e.to_string())?;
        let size = [img.height(), img.width()];
        let (v, h, w) = match s.image_grids.get(k) {
            Some(&g) => images.patches_for(&img, g),
            None => images.preprocess_in(&img, alone),
        }
        .map_err(|m| format!("{}: {m}", p.display()))?;
        out.images.push((v, h, w, size));
    }
    for c in &s.videos {
        let frames = c.decode().map_err(|e| e.to_string())?;
        let (v, grid) = images
            .video_patches(&frames)
            .map_err(|m| format!("{}: {m}", c.frames[0].display()))?;
        if grid != c.grid {
            return Err(format!(
                "{}: the clip's frames now give a {grid:?} patch grid, {:?} when the dataset was built (were the \
                 frames changed?)",
                c.frames[0].display(),
                c.grid
            ));
        }
        out.clips.push(v);
    }
    Ok(out)
}

/// Pads rows and loads the images and clips of one micro-batch. A sample whose media no longer decode (a file
/// changed on disk since the dataset's checks) is left out and listed in `dropped`; the stage's policy decides.
pub fn micro_batch(samples: &[&Encoded], pad_id: i64, images: &ImageProcessor) -> MicroBatch {
    let decoded: Vec<Result<Decoded, String>> =
        samples.par_iter().map(|s| decode(s, images)).collect();
    let mut dropped = vec![];
    let mut kept: Vec<(&Encoded, Decoded)> = vec![];
    for (s, d) in samples.iter().zip(decoded) {
        match d {
            Ok(d) => kept.push((s, d)),
            Err(e) => dropped.push((s.index, e)),
        }
    }
    let samples: Vec<&Encoded> = kept.iter().map(|k| k.0).collect();
    let t = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut mb = MicroBatch {
        ids: vec![],
        attention: vec![],
        labels: vec![],
        pixels: Ok(None),
        image_sizes: vec![],
        images_per_row: samples.iter().map(|s| s.images.len()).collect(),
        image_grids: samples
            .iter()
            .flat_map(|s| s.image_grids.iter().copied())
            .collect(),
        instructions: samples
            .iter()
            .flat_map(|s| s.instructions.iter().cloned())
            .collect(),
        tokens: samples.len() * t,
        supervised: 0,
        videos: Ok(None),
        video_grids: samples
            .iter()
            .flat_map(|s| s.videos.iter().map(|c| c.grid))
            .collect(),
        video_seconds: samples
            .iter()
            .flat_map(|s| s.videos.iter().map(|c| c.seconds_per_grid))
            .collect(),
        dropped,
    };
    for s in &samples {
        let pad = t - s.ids.len();
        let mut ids = s.ids.clone();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        let mut labels = s.labels.clone();
        labels.extend(std::iter::repeat_n(false, pad));
        // Targets are shifted: position 0 is never predicted.
        mb.supervised += labels.iter().skip(1).filter(|&&l| l).count();
        let mut att = vec![true; s.ids.len()];
        att.extend(std::iter::repeat_n(false, pad));
        mb.ids.push(ids);
        mb.labels.push(labels);
        mb.attention.push(att);
    }
    // the decoded values move into the batch (no copy): images first checked for one preprocessed size
    let first = kept
        .iter()
        .flat_map(|(_, d)| d.images.first())
        .next()
        .map(|x| (x.1, x.2));
    let odd = kept.iter().find_map(|(s, d)| {
        s.images
            .iter()
            .zip(&d.images)
            .find(|(_, x)| Some((x.1, x.2)) != first)
            .map(|(p, x)| (p.clone(), x.1, x.2))
    });
    let (mut values, mut clips) = (vec![], vec![]);
    for (_, d) in kept {
        for (v, _, _, size) in d.images {
            values.extend(v);
            mb.image_sizes.push(size);
        }
        for c in d.clips {
            clips.extend(c);
        }
    }
    if let Some((h, w)) = first {
        // one tensor holds the batch: a size that differs is a located error, not a panic in TensorData
        mb.pixels = match odd {
            Some((p, oh, ow)) => Err(format!(
                "{}: preprocesses to {oh}x{ow}, other images of the batch to {h}x{w}; set a fixed crop/resize in \
                 the image processor",
                p.display()
            )),
            None => {
                let c = images.channels();
                let n = values.len() / (c * (h * w) as usize);
                Ok(Some((values, [n, c, h as usize, w as usize])))
            }
        };
    }
    if !clips.is_empty() {
        let p = match &images.sizing {
            Some(Sizing::Native(n)) => n.patch as usize,
            _ => 1, // unreachable: video_patches needs native resolution
        };
        let c = images.channels();
        let n = clips.len() / (c * p * p);
        mb.videos = Ok(Some((clips, [n, c, p, p])));
    }
    mb
}

/// Produces the micro-batches of steps `from..to` on a background thread, `ahead` steps in advance.
pub fn prefetch(
    order: Arc<Order>,
    encoded: Arc<Vec<Encoded>>,
    images: Arc<ImageProcessor>,
    micro: usize,
    pad_id: i64,
    from: usize,
    to: usize,
    ahead: usize,
) -> Receiver<(usize, Vec<MicroBatch>)> {
    let (tx, rx) = sync_channel(ahead);
    std::thread::spawn(move || {
        let per_epoch = order.steps_per_epoch().max(1);
        let mut cached: Option<(usize, Vec<Vec<usize>>)> = None;
        for step in from..to {
            let epoch = step / per_epoch;
            if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                cached = Some((epoch, order.epoch(epoch)));
            }
            let batch = &cached.as_ref().unwrap().1[step % per_epoch];
            let micros = batch
                .chunks(micro)
                .map(|c| {
                    let s: Vec<&Encoded> = c.iter().map(|&i| &encoded[i]).collect();
                    micro_batch(&s, pad_id, &images)
                })
                .collect();
            if tx.send((step, micros)).is_err() {
                return;
            }
        }
    });
    rx
}
