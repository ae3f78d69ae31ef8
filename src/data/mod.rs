//! Data at the model's edge: tokenizer + chat templates + `<image>` expansion, and image preprocessing.
pub mod images;
pub mod tokenizer;
