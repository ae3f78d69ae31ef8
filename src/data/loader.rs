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
    /// Packed rows: `segments[r][i]` = which sample of row r token i belongs to (1, 2, …; 0 = padding). Empty when
    /// every row is one sample.
    pub segments: Vec<Vec<u32>>,
    /// Tokens incl. image placeholders and padding (what the model computes on).
    pub tokens: usize,
    /// Tokens of the samples themselves (`tokens` less padding).
    pub real: usize,
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

/// Sequence packing: `batch` (sample indices) into rows of at most `cap` tokens. As few rows as first fit
/// (longest first) needs, then filled evenly — each sample, longest first, into the shortest row it fits — so the
/// rows come out of similar length and padding to the longest row stays small. A sample longer than `cap` (none:
/// `max_len` cut them) gets a row of its own.
pub fn pack_rows(batch: &[usize], len: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let (long, mut order): (Vec<usize>, Vec<usize>) = batch.iter().partition(|&&i| len[i] > cap);
    order.sort_by_key(|&i| std::cmp::Reverse(len[i]));
    let mut used: Vec<usize> = vec![];
    for &i in &order {
        match used.iter_mut().find(|u| **u + len[i] <= cap) {
            Some(u) => *u += len[i],
            None => used.push(len[i]),
        }
    }
    let mut rows: Vec<(usize, Vec<usize>)> = vec![(0, vec![]); used.len()];
    for &i in &order {
        let shortest = rows
            .iter_mut()
            .filter(|(u, _)| u + len[i] <= cap)
            .min_by_key(|(u, _)| *u);
        match shortest {
            Some((u, row)) => {
                *u += len[i];
                row.push(i);
            }
            None => rows.push((len[i], vec![i])),
        }
    }
    rows.extend(long.into_iter().map(|i| (len[i], vec![i])));
    rows.retain(|(_, r)| !r.is_empty());
    rows.sort_by_key(|(u, _)| std::cmp::Reverse(*u));
    rows.into_iter().map(|(_, r)| r).collect()
}

/// Pads rows and loads the images and clips of one micro-batch. A sample whose media no longer decode (a file
/// changed on disk since the dataset's checks) is left out and listed in `dropped`; the stage's policy decides.
pub fn micro_batch(samples: &[&Encoded], pad_id: i64, images: &ImageProcessor) -> MicroBatch {
    let rows: Vec<Vec<&Encoded>> = samples.iter().map(|s| vec![*s]).collect();
    micro_batch_rows(&rows, pad_id, images, false)
}

/// `micro_batch` with several samples per row (`packed`: each row's samples one after the other, `segments`
/// telling them apart; a sample's first token is never a target, as at the start of an unpacked row).
pub fn micro_batch_rows(
    rows: &[Vec<&Encoded>],
    pad_id: i64,
    images: &ImageProcessor,
    packed: bool,
) -> MicroBatch {
    let all: Vec<&Encoded> = rows.iter().flatten().copied().collect();
    let decoded: Vec<Result<Decoded, String>> = all.par_iter().map(|s| decode(s, images)).collect();
    let mut dropped = vec![];
    let mut kept: Vec<(&Encoded, Decoded)> = vec![];
    for (s, d) in all.iter().zip(decoded) {
        match d {
            Ok(d) => kept.push((s, d)),
            Err(e) => dropped.push((s.index, e)),
        }
    }
    // rows of the samples that decoded, in order (a row left empty goes)
    let ok = |s: &Encoded| !dropped.iter().any(|(i, _)| *i == s.index);
    let rows: Vec<Vec<&Encoded>> = rows
        .iter()
        .map(|r| r.iter().copied().filter(|s| ok(s)).collect::<Vec<_>>())
        .filter(|r| !r.is_empty())
        .collect();
    let row_len = |r: &[&Encoded]| r.iter().map(|s| s.ids.len()).sum::<usize>();
    let t = rows.iter().map(|r| row_len(r)).max().unwrap_or(0);
    let samples: Vec<&Encoded> = kept.iter().map(|k| k.0).collect();
    let mut mb = MicroBatch {
        ids: vec![],
        attention: vec![],
        labels: vec![],
        pixels: Ok(None),
        image_sizes: vec![],
        images_per_row: rows
            .iter()
            .map(|r| r.iter().map(|s| s.images.len()).sum())
            .collect(),
        image_grids: samples
            .iter()
            .flat_map(|s| s.image_grids.iter().copied())
            .collect(),
        instructions: samples
            .iter()
            .flat_map(|s| s.instructions.iter().cloned())
            .collect(),
        segments: vec![],
        tokens: rows.len() * t,
        real: samples.iter().map(|s| s.ids.len()).sum(),
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
    for row in &rows {
        let (mut ids, mut labels, mut seg) = (vec![], vec![], vec![]);
        for (k, s) in row.iter().enumerate() {
            ids.extend(&s.ids);
            // Targets are shifted: a sample's first token is never predicted (in a packed row, not from the
            // previous sample's last token either).
            labels.push(false);
            labels.extend(s.labels.iter().skip(1));
            seg.extend(std::iter::repeat_n(k as u32 + 1, s.ids.len()));
        }
        let (n, pad) = (ids.len(), t - ids.len());
        ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend(std::iter::repeat_n(false, pad));
        seg.extend(std::iter::repeat_n(0, pad));
        mb.supervised += labels.iter().filter(|&&l| l).count();
        let mut att = vec![true; n];
        att.extend(std::iter::repeat_n(false, pad));
        mb.ids.push(ids);
        mb.labels.push(labels);
        mb.attention.push(att);
        if packed {
            mb.segments.push(seg);
        }
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

/// Produces the micro-batches of steps `from..to` on a background thread, `ahead` steps in advance; with `pack =
/// Some(max_len)`, each global batch packed into rows of up to that many tokens.
pub fn prefetch(
    order: Arc<Order>,
    encoded: Arc<Vec<Encoded>>,
    images: Arc<ImageProcessor>,
    micro: usize,
    pad_id: i64,
    pack: Option<usize>,
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
            // `micro` rows per micro-batch: one sample each, or packed up to `pack` tokens
            let rows = match pack {
                Some(cap) => pack_rows(batch, &order.len, cap),
                None => batch.iter().map(|&i| vec![i]).collect(),
            };
            let micros = rows
                .chunks(micro)
                .map(|c| {
                    let rows: Vec<Vec<&Encoded>> = c
                        .iter()
                        .map(|r| r.iter().map(|&i| &encoded[i]).collect())
                        .collect();
                    micro_batch_rows(&rows, pad_id, &images, pack.is_some())
                })
                .collect();
            if tx.send((step, micros)).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::pack_rows;

    #[test]
    fn packing_fills_few_even_rows_under_the_cap() {
        let len = [100, 90, 80, 70, 60, 50, 40, 30, 250];
        // without the over-long sample: 520 tokens in 3 rows of at most 200
        let rows = pack_rows(&[7, 0, 3, 1, 6, 2, 5, 4], &len, 200);
        let sums: Vec<usize> = rows
            .iter()
            .map(|r| r.iter().map(|&i| len[i]).sum())
            .collect();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(sums.iter().all(|&s| s <= 200), "{sums:?}");
        assert!(sums[0] - sums[2] <= 40, "uneven rows {sums:?}");
        let mut all: Vec<usize> = rows.concat();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        // a sample over the cap rides alone
        let rows = pack_rows(&[8, 0, 1], &len, 200);
        assert!(rows.contains(&vec![8]), "{rows:?}");
        assert_eq!(rows.len(), 2);
    }
}
