//! Evaluation as the survey describes it: closed-set benchmarks scored by metrics (VQA accuracy, multiple-choice
//! accuracy, POPE hallucination probing, BLEU/CIDEr captioning), zero-shot or with M-ICL demonstrations, and
//! M-CoT prompting. `data` reads the public layouts, `run` prompts, generates in batches and scores, `metrics`
//! holds the reference metric implementations.
pub mod data;
pub mod metrics;
pub mod run;

pub use data::TaskKind;
pub use run::{Options, Report, TaskSpec, run_task};
