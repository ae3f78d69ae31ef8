//! The parts of a model as recipes name them (`train = [...]`, `optim.part_lr`, adapters' `parts`), and which part
//! each parameter belongs to: model knowledge, read by the optimiser's groups and the adapters.

/// The parts of a model that `train = [...]`, `optim.part_lr` and adapters' `parts` name (a recipe writes their
/// names; the code holds this enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Encoder,
    Connector,
    Llm,
    /// A stage's own layers beside the LLaVA: the reward model's score, PPO's value head.
    Head,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Encoder, Part::Connector, Part::Llm, Part::Head];
    pub fn name(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Connector => "connector",
            Part::Llm => "llm",
            Part::Head => "head",
        }
    }
    pub fn parse(s: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// The component a parameter path belongs to, as recipes name them. Models that wrap the LLaVA (the reward model)
/// keep it under `llava.`; their own layers (the scalar `score` head) are the part `head`.
pub fn part_of(path: &str) -> Part {
    let path = path.strip_prefix("llava.").unwrap_or(path);
    if path.starts_with("score.") || path.starts_with("value.") {
        Part::Head
    } else if path.starts_with("vision_tower.") {
        Part::Encoder
    } else if path.starts_with("multi_modal_projector.") || path == "image_newline" {
        // LLaVA-NeXT's end-of-row embedding learns with the projector (LLaVA-NeXT's own training unfreezes both)
        Part::Connector
    } else {
        Part::Llm
    }
}
