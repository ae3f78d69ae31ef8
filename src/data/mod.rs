//! Data: dataset readers, chat templates and loss masks, the checks run before training, batching with
//! prefetch, image and clip preprocessing, and the synthetic shapes world of the quickstart.
pub mod contract;
pub mod images;
pub mod loader;
pub mod preference;
pub mod prepare;
pub mod shapes;
pub mod shapes_eval;
pub mod sources;
pub mod templates;
pub mod tokenizer;
pub mod video;
