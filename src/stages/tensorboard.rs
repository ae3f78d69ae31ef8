//! TensorBoard event files beside metrics.jsonl, so `tensorboard --logdir checkpoints/runs` shows the runs: every
//! numeric field of a metrics line becomes a scalar `<stage>/<field>` at the line's step. The file format is
//! TFRecord (u64 length, masked CRC-32C of the length, the record, masked CRC-32C of the record) holding
//! `tensorflow.Event` protobufs (wall_time = 1, step = 2, file_version = 3, summary = 5 → Summary.value = 1 →
//! Value{tag = 1, simple_value = 2}); the few fields needed are encoded by hand rather than pulling protobuf in.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn event(wall: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![];
    varint(1 << 3 | 1, &mut e); // wall_time: double
    e.extend_from_slice(&wall.to_le_bytes());
    varint(2 << 3, &mut e); // step: int64 varint
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

impl EventWriter {
    /// Opens a new event file in `dir` (TensorBoard reads every `events.out.tfevents.*` file there).
    pub fn create(dir: &Path) -> Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let path = dir.join(format!(
            "events.out.tfevents.{}.mitune.{}",
            now.as_secs(),
            std::process::id()
        ));
        let file = std::fs::File::create(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let mut w = EventWriter { file, path };
        let first = event(now.as_secs_f64(), 0, |e| {
            bytes_field(3, b"brain.Event:2", e)
        });
        w.record(&first)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes scalars `(tag, value)` at `step`.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let e = event(wall, step, |e| {
            let mut summary = vec![];
            for (tag, v) in values {
                let mut value = vec![];
                bytes_field(1, tag.as_bytes(), &mut value);
                varint(2 << 3 | 5, &mut value); // simple_value: float
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(1, &value, &mut summary);
            }
            bytes_field(5, &summary, e);
        });
        self.record(&e)
    }

    /// Mirrors one metrics.jsonl line: numeric fields other than `step` become `<stage>/<field>` (held-out
    /// accuracy lines become `<stage>/heldout/<task>`).
    pub fn metrics(&mut self, v: &serde_json::Value) -> Result<()> {
        let Some(obj) = v.as_object() else {
            return Ok(());
        };
        let stage = obj.get("stage").and_then(|s| s.as_str()).unwrap_or("run");
        let step = obj.get("step").and_then(|s| s.as_i64()).unwrap_or(0);
        let prefix = match obj.get("heldout").and_then(|h| h.as_str()) {
            Some(task) => format!("{stage}/heldout/{task}"),
            None => stage.to_string(),
        };
        let values: Vec<(String, f32)> = obj
            .iter()
            .filter(|(k, _)| *k != "step")
            .filter_map(|(k, x)| x.as_f64().map(|f| (format!("{prefix}/{k}"), f as f32)))
            .collect();
        self.scalars(step, &values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_frame_with_masked_crc32c() {
        // CRC-32C("123456789") = 0xE3069283 (the standard check value)
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let d = std::env::temp_dir().join(format!("mitune-tb-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mut w = EventWriter::create(&d).unwrap();
        w.metrics(&serde_json::json!({"stage": "align", "step": 3, "loss": 1.5}))
            .unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        // first record: the file version event
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            masked_crc(&bytes[..8])
        );
        let rec = &bytes[12..12 + n];
        assert!(rec.windows(13).any(|x| x == b"brain.Event:2"));
        let second = &bytes[12 + n + 4..];
        let m = u64::from_le_bytes(second[..8].try_into().unwrap()) as usize;
        let body = &second[12..12 + m];
        assert!(body.windows(10).any(|x| x == b"align/loss"));
        assert!(body.windows(4).any(|x| x == 1.5f32.to_le_bytes()));
        assert_eq!(
            u32::from_le_bytes(second[12 + m..16 + m].try_into().unwrap()),
            masked_crc(body)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
