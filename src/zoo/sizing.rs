//! How an image's size decides what the model reads of it, for the layouts where it does: LLaVA-NeXT/OneVision's
//! AnyRes tiles (`zoo::anyres`) and Qwen2-VL's native resolution (`zoo::native`). One enum, so the text processor
//! (placeholder counts), the image processor (tiles or patches) and the model (its check before compute) ask the
//! same question the same way; a layout without one gives every image the connector's fixed count.
use super::anyres::AnyRes;
use super::native::NativeRes;

#[derive(Debug, Clone, PartialEq)]
pub enum Sizing {
    AnyRes(AnyRes),
    Native(NativeRes),
}

impl Sizing {
    /// LLM tokens for an image of original (height, width); `alone`: it is its sample's only image.
    pub fn tokens(&self, h: u32, w: u32, alone: bool) -> Result<usize, String> {
        match self {
            Sizing::AnyRes(a) => Ok(a.tokens(h, w, alone)),
            Sizing::Native(n) => n.tokens(h, w),
        }
    }

    /// Encoder inputs for the image: AnyRes tiles, or native-resolution patches.
    pub fn inputs(&self, h: u32, w: u32, alone: bool) -> Result<usize, String> {
        match self {
            Sizing::AnyRes(a) => Ok(a.tiles(h, w, alone)),
            Sizing::Native(n) => n.grid(h, w).map(|g| g[0] * g[1] * g[2]),
        }
    }
}

/// A native-resolution model's image and clip budget as a recipe sets it (`model.*` or `stages.NAME.data.*`);
/// `None` keeps what the checkpoint says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budget {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    pub video_min_pixels: Option<u64>,
    pub video_max_pixels: Option<u64>,
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
    pub frame_rate: Option<f64>,
}

impl Budget {
    pub fn is_empty(&self) -> bool {
        *self == Budget::default()
    }
}
