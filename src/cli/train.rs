//! `mitune train RECIPE [--set k=v]... [--resume|--fresh]` and `mitune validate RECIPE [--set k=v]... [--data]`.
use clap::Args as ClapArgs;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::recipe::schema::StageSpec;
use crate::stages::run::{self, Existing};

#[derive(ClapArgs)]
pub struct TrainArgs {
    /// Recipe file (TOML).
    pub recipe: PathBuf,
    /// Override a recipe key: `--set stages.instruct.optim.lr=1e-5` (the key must exist).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue the run from its last checkpoint (exactly: weights, optimizer, data position).
    #[arg(long, conflicts_with = "fresh")]
    pub resume: bool,
    /// Delete an existing run of this name and start over.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(ClapArgs)]
pub struct ValidateArgs {
    pub recipe: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Also dry-run the data of every stage: images, markers, lengths, supervised tokens.
    #[arg(long)]
    pub data: bool,
}

fn load(
    recipe: &std::path::Path,
    sets: &[String],
) -> Result<(crate::recipe::schema::Recipe, String)> {
    match crate::recipe::load(recipe, sets) {
        Ok((rc, resolved)) => Ok((rc, toml::to_string(&resolved.table).unwrap_or_default())),
        Err(errs) => {
            for e in &errs {
                eprintln!("error: {e}");
            }
            Err(Error::input(format!(
                "{}: {} problem(s) in the recipe",
                recipe.display(),
                errs.len()
            )))
        }
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    let (rc, text) = load(&a.recipe, &a.sets)?;
    let existing = match (a.resume, a.fresh) {
        (true, _) => Existing::Resume,
        (_, true) => Existing::Fresh,
        _ => Existing::Refuse,
    };
    let device = crate::default_device().autodiff();
    run::train(&rc, &text, existing, &device)?;
    Ok(())
}

pub fn validate(a: ValidateArgs) -> Result<()> {
    let (rc, _) = load(&a.recipe, &a.sets)?;
    println!(
        "{}: ok ({} stages: {})",
        a.recipe.display(),
        rc.pipeline.len(),
        rc.pipeline.join(" -> ")
    );
    // The model's spec from config files alone (weights that a stage of this run makes do not exist yet).
    let from_run = rc.model.from.as_ref().is_some_and(|d| !d.exists());
    if !from_run {
        let (spec, _, _) = crate::model::plan(&rc.model)?;
        let f = spec.features();
        if spec.native.is_some() {
            println!(
                "model: connector {} merges each block of {} patch features of width {} into one image token",
                spec.connector.kind(),
                f.tokens,
                f.width
            );
        } else {
            println!(
                "model: connector {} takes {} encoder tokens of width {} and gives {} image tokens per image",
                spec.connector.kind(),
                f.tokens,
                f.width,
                spec.image_tokens()
            );
        }
        if let Some(n) = &spec.native {
            let f = n.factor();
            let eg = |h: u32, w: u32| n.tokens(h, w).map_or("-".to_string(), |t| t.to_string());
            println!(
                "model: native resolution: each image resized into {}..{} pixels, sides multiples of {f} px; {f}×{f} \
                 pixels per image token (e.g. 448×448 px -> {}, 1080×1920 px -> {} tokens; set model.max_pixels to \
                 bound memory)",
                n.min_pixels,
                n.max_pixels,
                eg(448, 448),
                eg(1080, 1920)
            );
        }
        if let Some(x) = &spec.anyres {
            let t = x.tile;
            println!(
                "model: AnyRes tiles of {t} px over pinpoints {:?}: {} image tokens per tile, per image {} + rows × (cols + 1) \
                 after unpadding (e.g. {t}×{t} px -> {}, {}×{} px -> {}, {}×{} px -> {})",
                x.pinpoints,
                spec.image_tokens(),
                spec.image_tokens(),
                x.tokens(t, t, true),
                t,
                2 * t,
                x.tokens(t, 2 * t, true),
                2 * t,
                2 * t,
                x.tokens(2 * t, 2 * t, true)
            );
        }
    }
    // each stage's own pixel budget is checked here, before any data or weights
    if !from_run {
        let (spec, _, _) = crate::model::plan(&rc.model)?;
        for name in &rc.pipeline {
            if let Some(t) = rc.stages[name].train() {
                let key = format!("stages.{name}.data");
                let mut stage = spec.clone();
                let null = &mut serde_json::Value::Null;
                crate::model::apply_budget(&t.data.budget(), &key, &mut stage, null)?;
                // and each source's own budget over the stage's
                for (i, src) in t.data.sources.iter().enumerate() {
                    let key = format!("{key}.sources[{i}]");
                    crate::model::apply_budget(&src.budget(), &key, &mut stage.clone(), null)?;
                }
            }
        }
    }
    if !a.data {
        return Ok(());
    }
    run::prepare_data(&rc)?;
    let device = crate::default_device();
    let mut built = crate::model::build(&rc.model, false, &device)?;
    let (base_spec, base_processor) = (built.model.spec.clone(), built.processor.clone());
    for name in &rc.pipeline {
        let dir = rc.output.join(&rc.name).join("validate");
        let template =
            |t| crate::data::templates::training_source(t, &built.text).map_err(Error::input);
        // preference pairs and RL prompts go through the same contract as instruction data
        match &rc.stages[name] {
            StageSpec::Dpo(p) | StageSpec::Reward(p) => {
                let load = |d, k: &str, list: &str| -> Result<_> {
                    crate::stages::pairs::load_encode(
                        d,
                        &built.text,
                        &template(p.template)?,
                        p.max_len,
                        p.on_bad_sample,
                        &dir.join(name).join(list),
                        &format!("stages.{name}.{k}"),
                    )
                };
                let pairs = load(&p.data, "data", "skipped.jsonl")?;
                let held = match &p.heldout {
                    Some(h) => load(h, "heldout", "skipped-heldout.jsonl")?.len(),
                    None => 0,
                };
                let longest = pairs
                    .iter()
                    .map(|(c, r)| c.ids.len().max(r.ids.len()))
                    .max()
                    .unwrap_or(0);
                println!(
                    "stages.{name}: {} pairs ok, longest {longest}/{} tokens; {held} held-out pairs",
                    pairs.len(),
                    p.max_len
                );
            }
            StageSpec::Grpo(r) | StageSpec::Ppo(r) => {
                let list = |f: &str| dir.join(name).join(f);
                let prompts = crate::stages::rl::load_data(
                    &r.data,
                    r.on_bad_sample,
                    &list("skipped.jsonl"),
                    &format!("stages.{name}.data"),
                )?;
                let held = match &r.heldout {
                    Some(h) => crate::stages::rl::load_data(
                        h,
                        r.on_bad_sample,
                        &list("skipped-heldout.jsonl"),
                        &format!("stages.{name}.heldout"),
                    )?
                    .len(),
                    None => 0,
                };
                println!(
                    "stages.{name}: {} prompts ok, {held} held-out prompts",
                    prompts.len()
                );
            }
            StageSpec::Kto(k) => {
                let list = |f: &str| dir.join(name).join(f);
                let load = |d, k_: &str, f: &str| {
                    crate::stages::kto::load_encode(
                        d,
                        &built,
                        &template(k.template)?,
                        k,
                        &list(f),
                        &format!("stages.{name}.{k_}"),
                    )
                };
                let ex = load(&k.data, "data", "skipped.jsonl")?;
                let held = match &k.heldout {
                    Some(h) => load(h, "heldout", "skipped-heldout.jsonl")?.len(),
                    None => 0,
                };
                let good = ex.iter().filter(|e| e.0.label).count();
                println!(
                    "stages.{name}: {} examples ok ({good} desirable), {held} held-out examples",
                    ex.len()
                );
            }
            StageSpec::Align(_) | StageSpec::Instruct(_) | StageSpec::Pretrain(_) => {}
            StageSpec::Eval(_) => {}
        }
        let Some(t) = rc.stages[name].train() else {
            continue;
        };
        // each stage's own pixel budget over the model's (as `train` applies it)
        built.model.spec = base_spec.clone();
        built.processor = base_processor.clone();
        built.text.configure(&base_spec);
        built.images.configure(&base_spec);
        crate::model::stage_budget(&mut built, &t.data.budget(), &format!("stages.{name}.data"))?;
        let template = crate::data::templates::training_source(t.template, &built.text)
            .map_err(Error::input)?;
        // every bad sample is listed beside the run's outputs (nothing else of the run is written)
        let dir = rc.output.join(&rc.name).join("validate");
        let p = crate::data::prepare::prepare(
            &t.data,
            &built.text,
            &template,
            t.max_len,
            rc.seed,
            t.on_bad_sample,
            &dir,
            &format!("{name}-bad.jsonl"),
            &format!("stages.{name}.data"),
        )?;
        let sup: usize = p.encoded.iter().map(|e| e.supervised()).sum();
        let longest = p.encoded.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        println!(
            "stages.{name}: {} samples ok, {} skipped, {sup} supervised tokens, longest {longest}/{} tokens",
            p.encoded.len(),
            p.bad.len(),
            t.max_len
        );
        // what the image settings cost before training: image tokens per sample
        let mut img: Vec<usize> = p
            .encoded
            .iter()
            .map(|e| {
                e.ids
                    .iter()
                    .filter(|&&x| x == built.text.image_token_id)
                    .count()
            })
            .filter(|&n| n > 0)
            .collect();
        img.sort_unstable();
        if !img.is_empty() {
            println!(
                "stages.{name}: image tokens per sample with images ({}): min {}, median {}, max {}",
                img.len(),
                img[0],
                img[img.len() / 2],
                img[img.len() - 1]
            );
        }
        // and what the clip settings cost: video tokens and frames per sample
        if let (Some((_, vid)), Some(n)) = (&built.text.video_token, &built.model.spec.native) {
            let mut tok: Vec<(usize, usize)> = p
                .encoded
                .iter()
                .filter(|e| !e.videos.is_empty())
                .map(|e| {
                    let t = e.ids.iter().filter(|&&x| x == *vid).count();
                    (t, e.videos.iter().map(|c| c.frames.len()).sum())
                })
                .collect();
            tok.sort_unstable();
            if !tok.is_empty() {
                let frames = tok.iter().map(|x| x.1).max().unwrap_or(0);
                println!(
                    "stages.{name}: video tokens per sample with clips ({}): min {}, median {}, max {} (at most \
                     {frames} frames per sample; sampled at {} fps, at most {} frames per clip, each frame in \
                     {}..{} pixels)",
                    tok.len(),
                    tok[0].0,
                    tok[tok.len() / 2].0,
                    tok[tok.len() - 1].0,
                    n.video.fps,
                    n.video.max_frames,
                    n.video.min_pixels,
                    n.video.max_pixels
                );
            }
        }
    }
    Ok(())
}
