//! Training stages and the one step engine they all run through (`steps::Engine`): `trainer` (align, instruct,
//! pretrain), `dpo`, `reward`, `grpo`, `ppo`; model building from the recipe, parameter groups, schedules, losses,
//! run-state checkpoints, logging and held-out metrics; `run` orders the pipeline.
pub mod adamw;
pub mod build;
pub mod checkpoints;
pub mod dpo;
pub mod eval;
pub mod grpo;
pub mod heldout;
pub mod log;
pub mod loss;
pub mod optim;
pub mod params;
pub mod ppo;
pub mod pref_loss;
pub mod reward;
pub mod rollout;
pub mod run;
pub mod schedule;
pub mod steps;
pub mod tensorboard;
pub mod trainer;
