//! Training stages and the one step engine they all run through (`steps::Engine`: the prologue, the step body —
//! micro-batches sharded over ranks, accumulated, all-reduced, the update —, adapters, the step tail, checkpoints,
//! the final save). One file per stage kind, its loss in view: `trainer` (align, instruct, pretrain), `dpo`,
//! `reward`, `grpo`, `ppo`, `kto`; no stage file imports another: what several share has its own file (`backward`:
//! the backward pass with activation checkpointing; `adapters`; `pairs`: preference pairs; `reward_model`; `rl`,
//! `rollout` and `rewards`: prompts, rollouts and their rewards). Also model building from the recipe, parameter groups,
//! schedules, losses, run-state checkpoints, logging and held-out metrics; `run` orders the pipeline.
pub mod adamw;
pub mod adapters;
pub mod backward;
pub mod batches;
pub mod checkpoints;
pub mod dpo;
pub mod eval;
pub mod grpo;
pub mod heldout;
pub mod kto;
pub mod log;
pub mod loss;
pub mod optim;
pub mod pairs;
pub mod params;
pub mod ppo;
pub mod pref_loss;
pub mod reward;
pub mod reward_model;
pub mod rewards;
pub mod rl;
pub mod rollout;
pub mod run;
pub mod schedule;
pub mod steps;
pub mod tensorboard;
pub mod trainer;
