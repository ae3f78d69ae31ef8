//! Clips for video models (Qwen2-VL / Qwen2.5-VL): a clip is a directory of its frames (PNG or JPEG, in name
//! order, numbers compared as numbers) or a list of frame files. mitune decodes no video container: no pure-Rust
//! decoder of the common codecs is maintained, so a user extracts frames once (`ffmpeg -i clip.mp4 -vf fps=2
//! clip/%05d.jpg`) and names the directory, with the rate it was extracted at as `frame_rate`.
//!
//! Which frames the model reads is fixed when the dataset is built (`zoo::native::VideoRes::sample`), as is each
//! clip's grid and so its placeholder count; the loader decodes only the chosen frames.
use std::path::{Path, PathBuf};

use super::images::load_image;
use crate::error::{Error, Result};
use crate::zoo::native::NativeRes;

/// Where a sample's clip is: a directory of frames, or its frames listed in the record.
#[derive(Debug, Clone, PartialEq)]
pub enum ClipSource {
    Dir(PathBuf),
    Frames(Vec<PathBuf>),
}

/// A clip as the model reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    /// The sampled frames, in order.
    pub frames: Vec<PathBuf>,
    /// (height, width) of the frames as stored.
    pub size: [u32; 2],
    /// The patch grid (temporal patches, rows, cols): `video_grid_thw`.
    pub grid: [usize; 3],
    /// Seconds one temporal patch spans (`second_per_grid_ts`): temporal / sampled fps.
    pub seconds_per_grid: f64,
}

const FRAME_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "bmp", "webp"];
const CONTAINER_EXTENSIONS: [&str; 8] = ["mp4", "mkv", "avi", "mov", "webm", "flv", "m4v", "gif"];

impl ClipSource {
    /// A record's clip: a string names a directory (or, wrongly, a video file: reported when opened), a list
    /// names the frames.
    pub fn from_json(v: &serde_json::Value, base: &Path) -> std::result::Result<Self, String> {
        match v {
            serde_json::Value::String(s) => Ok(ClipSource::Dir(base.join(s))),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|f| {
                    f.as_str()
                        .map(|s| base.join(s))
                        .ok_or_else(|| "a clip's frame paths must be strings".to_string())
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(ClipSource::Frames),
            _ => Err("a video must be a frame directory (string) or a list of frame files".into()),
        }
    }

    /// Where the clip is, for messages.
    pub fn path(&self) -> &Path {
        match self {
            ClipSource::Dir(d) => d,
            ClipSource::Frames(f) => f.first().map(PathBuf::as_path).unwrap_or(Path::new("")),
        }
    }

    /// Every frame of the clip, in order.
    pub fn frames(&self) -> Result<Vec<PathBuf>> {
        let dir = match self {
            ClipSource::Frames(f) if f.is_empty() => {
                return Err(Error::input(
                    "a clip's frame list is empty: list its frame files",
                ));
            }
            ClipSource::Frames(f) => return Ok(f.clone()),
            ClipSource::Dir(d) => d,
        };
        let ext = |p: &Path| {
            p.extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .unwrap_or_default()
        };
        if dir.is_file() && CONTAINER_EXTENSIONS.contains(&ext(dir).as_str()) {
            return Err(Error::file(
                dir,
                "is a video file: mitune reads a clip as a directory of its frames. Extract them once, e.g. \
                 `ffmpeg -i CLIP -vf fps=2 DIR/%05d.jpg`, name DIR instead, and set the stage's `frame_rate` to the \
                 rate you extracted at (2 here)",
            ));
        }
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let mut frames: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && FRAME_EXTENSIONS.contains(&ext(p).as_str()))
            .collect();
        if frames.is_empty() {
            return Err(Error::file(
                dir,
                "the clip directory has no frames (.png, .jpg, .jpeg, .bmp or .webp files): extract them, e.g. \
                 `ffmpeg -i CLIP -vf fps=2 DIR/%05d.jpg`",
            ));
        }
        frames.sort_by(|a, b| natural(a).cmp(&natural(b)));
        Ok(frames)
    }

    /// Samples the clip as the model's video settings say (`frame_rate`: the rate the frames were recorded or
    /// extracted at; the sampling rate when unknown, so every frame is used) and sizes it from its first frame's
    /// header: everything the placeholder count needs, without decoding a frame.
    pub fn open(&self, n: &NativeRes) -> Result<Clip> {
        let frame_rate = n.video.frame_rate;
        let all = self.frames()?;
        let s = n
            .video
            .sample(
                all.len(),
                frame_rate.unwrap_or(n.video.fps),
                n.temporal as usize,
            )
            .map_err(|m| Error::file(self.path(), m))?;
        let frames: Vec<PathBuf> = s.indices.iter().map(|&i| all[i].clone()).collect();
        let (w, h) = image::image_dimensions(&frames[0])
            .map_err(|e| Error::file(&frames[0], format!("cannot read the frame's size: {e}")))?;
        let grid = n
            .video_grid(frames.len(), h, w)
            .map_err(|m| Error::file(&frames[0], m))?;
        Ok(Clip {
            frames,
            size: [h, w],
            grid,
            seconds_per_grid: n.temporal as f64 / s.fps,
        })
    }
}

impl Clip {
    /// Decodes the clip's frames.
    pub fn decode(&self) -> Result<Vec<image::DynamicImage>> {
        self.frames.iter().map(|p| load_image(p)).collect()
    }
}

/// A sort key that orders `frame_2` before `frame_10`: runs of digits compare as numbers.
fn natural(p: &Path) -> Vec<(String, u64)> {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut out = vec![];
    let mut text = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut num = c.to_digit(10).unwrap() as u64;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                num = num.saturating_mul(10).saturating_add(d as u64);
                chars.next();
            }
            out.push((std::mem::take(&mut text), num));
        } else {
            text.push(c);
        }
    }
    out.push((text, u64::MAX));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_sort_naturally() {
        let mut v: Vec<PathBuf> = ["f10.png", "f2.png", "f1.png"].map(PathBuf::from).to_vec();
        v.sort_by(|a, b| natural(a).cmp(&natural(b)));
        assert_eq!(
            v,
            ["f1.png", "f2.png", "f10.png"].map(PathBuf::from).to_vec()
        );
    }
}
