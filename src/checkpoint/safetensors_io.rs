//! Reading and writing safetensors weights in HuggingFace layout: a single `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped; each tensor is cast to f32 (the compute dtype) when it
//! is read, so f32, bf16 and f16 checkpoints all load. Every error names the file and the tensor.
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// All tensors of one checkpoint directory, by name.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap, usize)>, // (path, map, data start)
    index: HashMap<String, (usize, TensorInfo)>,
}

/// A tensor read from a store: row-major f32 values and the stored shape/dtype.
pub struct Loaded {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub dtype: Dtype,
}

impl WeightStore {
    /// Opens `dir/model.safetensors.index.json` if present, else `dir/model.safetensors`, else every
    /// `*.safetensors` file in `dir` (standalone exports sometimes use other names).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = crate::error::read_json(&index_path)?;
            let mut shards: Vec<String> = idx.weight_map.values().cloned().collect();
            shards.sort();
            shards.dedup();
            shards.iter().map(|s| dir.join(s)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| Error::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(Error::file(
                    dir,
                    "no model.safetensors, model.safetensors.index.json or *.safetensors file: \
                     is this a HuggingFace checkpoint directory?",
                ));
            }
            v
        };
        Self::open_files(&files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let f = std::fs::File::open(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the map is read-only; a checkpoint modified while mitune reads it is the user's race.
            let map = unsafe { Mmap::map(&f) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                Error::file(path, format!("not a valid safetensors file ({e}); it may be truncated or corrupt: re-download or re-save it"))
            })?;
            for (name, info) in meta.tensors() {
                if let Some((j, _)) = index.get(&name) {
                    let other: &PathBuf = &paths[*j];
                    return Err(Error::key(
                        path,
                        &name,
                        format!("tensor also stored in {}", other.display()),
                    ));
                }
                index.insert(name, (i, info.clone()));
            }
            files.push((path.clone(), map, 8 + n));
        }
        Ok(WeightStore { files, index })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// The file holding `key` (for error messages).
    pub fn path_of(&self, key: &str) -> Option<&Path> {
        self.index.get(key).map(|(i, _)| self.files[*i].0.as_path())
    }

    /// A human name for the store: its first file, or its directory for shards.
    pub fn describe(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _, _)] => p.clone(),
            [(p, _, _), ..] => p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| p.clone()),
            [] => PathBuf::from("<empty>"),
        }
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.index.get(key).map(|(_, info)| info.shape.as_slice())
    }

    pub fn dtype(&self, key: &str) -> Option<Dtype> {
        self.index.get(key).map(|(_, info)| info.dtype)
    }

    /// Reads one tensor as f32.
    pub fn get(&self, key: &str) -> Result<Loaded> {
        let (i, info) = self
            .index
            .get(key)
            .ok_or_else(|| Error::key(self.describe(), key, "missing tensor"))?;
        let (path, map, start) = &self.files[*i];
        let bytes = &map[start + info.data_offsets.0..start + info.data_offsets.1];
        let values = to_f32(bytes, info.dtype).ok_or_else(|| {
            Error::key(
                path,
                key,
                format!(
                    "unsupported dtype {:?} (mitune reads F32, BF16, F16, F64)",
                    info.dtype
                ),
            )
        })?;
        Ok(Loaded {
            shape: info.shape.clone(),
            values,
            dtype: info.dtype,
        })
    }
}

fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        _ => return None,
    })
}

/// A tensor to write: name, shape, f32 values (stored as `dtype`).
pub struct ToWrite {
    pub name: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    pub dtype: Dtype,
}

impl ToWrite {
    pub fn f32(name: String, shape: Vec<usize>, values: &[f32], dtype: Dtype) -> Self {
        let bytes = match dtype {
            Dtype::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let dtype = if matches!(dtype, Dtype::BF16 | Dtype::F16) {
            dtype
        } else {
            Dtype::F32
        };
        ToWrite {
            name,
            shape,
            bytes,
            dtype,
        }
    }
}

impl safetensors::View for &ToWrite {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `model.safetensors` atomically (temp file + rename) with `{"format": "pt"}` metadata, which transformers
/// expects.
pub fn write_file(path: &Path, tensors: &[ToWrite]) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(
        tensors.iter().map(|t| (t.name.as_str(), t)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| match e {
        // disk full, size limits, permissions: the I/O error says what to do
        safetensors::SafeTensorError::IoError(source) => Error::Io {
            path: tmp.clone(),
            source,
        },
        e => Error::file(&tmp, format!("cannot write safetensors: {e}")),
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The safetensors dtype of a recipe's storage dtype (`export = { dtype = "bf16" }`).
pub fn store_dtype(d: crate::recipe::schema::StoreDtype) -> Dtype {
    use crate::recipe::schema::StoreDtype;
    match d {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::Bf16 => Dtype::BF16,
        StoreDtype::F16 => Dtype::F16,
    }
}
