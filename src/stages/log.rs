//! Run logging: `metrics.jsonl` (one JSON object per line, flushed as written; mirrored into TensorBoard event
//! files beside it) and a progress bar per stage
//! (indicatif on a terminal; plain lines every few percent otherwise, so CI logs stay readable).
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::Path;

use crate::error::{Error, Result};

pub struct Metrics {
    /// None on the ranks of a data-parallel job that do not write (rank 0 logs the job)
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
    /// TensorBoard's view of the same lines (a new event file per process; TensorBoard reads them all).
    events: Option<super::tensorboard::EventWriter>,
}

impl Metrics {
    pub fn open(path: &Path) -> Result<Self> {
        if !crate::dist::writer() {
            return Ok(Metrics {
                file: None,
                path: path.to_path_buf(),
                events: None,
            });
        }
        drop_torn_line(path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let events = match path.parent() {
            Some(dir) => Some(super::tensorboard::EventWriter::create(dir)?),
            None => None,
        };
        Ok(Metrics {
            file: Some(file),
            path: path.to_path_buf(),
            events,
        })
    }

    pub fn write(&mut self, v: serde_json::Value) -> Result<()> {
        if let Some(e) = &mut self.events {
            e.metrics(&v)?;
        }
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        writeln!(file, "{v}")
            .and_then(|_| file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// A run killed in the middle of writing a line leaves it torn; the resumed run's lines would be glued to it.
/// The torn tail is cut back to the last complete line (that step is logged again when it reruns).
fn drop_torn_line(path: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(()); // a new run
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io)?;
    f.set_len(keep as u64).map_err(io)
}

pub struct Progress {
    bar: Option<ProgressBar>,
    name: String,
    total: usize,
    last_print: usize,
}

impl Progress {
    pub fn new(name: &str, start: usize, total: usize) -> Self {
        let bar = (std::io::stderr().is_terminal() && crate::dist::writer()).then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            b.set_prefix(name.to_string());
            b.set_position(start as u64);
            b
        });
        Progress {
            bar,
            name: name.into(),
            total,
            last_print: start,
        }
    }

    /// `tok_s`: supervised-token throughput where the stage counts it (None: preference and RL stages).
    pub fn update(&mut self, step: usize, loss: f64, lr: f64, tok_s: Option<f64>) {
        // data parallel: every rank has the same loss; rank 0 reports it
        if !crate::dist::writer() {
            return;
        }
        let mut msg = format!("loss {loss:.4} lr {lr:.2e}");
        if let Some(t) = tok_s {
            msg += &format!(" {t:.0} tok/s");
        }
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg);
            }
            None => {
                let every = (self.total / 10).max(1);
                if step - self.last_print >= every || step == self.total {
                    eprintln!("[{}] step {step}/{} {msg}", self.name, self.total);
                    self.last_print = step;
                }
            }
        }
    }

    pub fn note(&self, msg: &str) {
        if !crate::dist::writer() {
            return;
        }
        match &self.bar {
            Some(b) => b.println(format!("[{}] {msg}", self.name)),
            None => eprintln!("[{}] {msg}", self.name),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
