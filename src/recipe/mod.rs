//! Recipes: schema (serde types), resolution (extends + `--set`), and validation that collects every error with
//! its key path and, where the TOML source gives it, file:line.
pub mod resolve;
pub mod schema;
pub mod sweep;

use std::path::Path;

use resolve::Resolved;
use schema::{Heldout, ModelSpec, Part, Prepare, Recipe, StageSpec};

/// Known top-level keys (anything else is a typo).
const TOP: [&str; 8] = [
    "name", "seed", "pipeline", "output", "prepare", "model", "stages", "heldout",
];

/// One validation error: where, and what.
#[derive(Debug, Clone)]
pub struct Problem {
    pub at: String,
    pub key: String,
    pub msg: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: `{}`: {}", self.at, self.key, self.msg)
    }
}

fn problem(r: &Resolved, key: &str, msg: impl Into<String>) -> Problem {
    let path: Vec<String> = key
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let at = r.locate(&path).map(|l| l.to_string()).unwrap_or_else(|| {
        r.files
            .first()
            .map(|f| f.display().to_string())
            .unwrap_or_default()
    });
    Problem {
        at,
        key: key.to_string(),
        msg: msg.into(),
    }
}

/// Deserializes `value` as `T`, reporting the key path serde got stuck at (prefixed by `base`).
fn section<T: serde::de::DeserializeOwned>(
    r: &Resolved,
    base: &str,
    value: toml::Value,
    out: &mut Vec<Problem>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let key = if inner == "." || inner.is_empty() {
                base.to_string()
            } else {
                format!("{base}.{inner}")
            };
            out.push(problem(r, &key, e.into_inner().to_string()));
            None
        }
    }
}

/// A stage table: `kind` picks the variant; the rest deserializes with full key paths (serde's internally tagged
/// enums buffer their content and lose the path, so the tag is read by hand).
fn stage(r: &Resolved, name: &str, v: &toml::Value, errs: &mut Vec<Problem>) -> Option<StageSpec> {
    let key = format!("stages.{name}");
    let Some(tab) = v.as_table() else {
        errs.push(problem(r, &key, "must be a table"));
        return None;
    };
    let kind = tab.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let mut rest = tab.clone();
    rest.remove("kind");
    let rest = toml::Value::Table(rest);
    let mut body = || section::<schema::TrainStage>(r, &key, rest.clone(), errs);
    match kind {
        "align" => body().map(StageSpec::Align),
        "instruct" => body().map(StageSpec::Instruct),
        "pretrain" => body().map(StageSpec::Pretrain),
        "eval" => section::<schema::EvalStage>(r, &key, rest.clone(), errs).map(StageSpec::Eval),
        "dpo" => section::<schema::PrefStage>(r, &key, rest.clone(), errs).map(StageSpec::Dpo),
        "reward" => {
            section::<schema::PrefStage>(r, &key, rest.clone(), errs).map(StageSpec::Reward)
        }
        "grpo" => section::<schema::RlStage>(r, &key, rest.clone(), errs).map(StageSpec::Grpo),
        "ppo" => section::<schema::RlStage>(r, &key, rest.clone(), errs).map(StageSpec::Ppo),
        "kto" => section::<schema::KtoStage>(r, &key, rest.clone(), errs).map(StageSpec::Kto),
        other => {
            errs.push(problem(
                r,
                &format!("{key}.kind"),
                format!(
                    "unknown stage kind {other:?} (known: align, instruct, pretrain, eval, dpo, reward, grpo, ppo)"
                ),
            ));
            None
        }
    }
}

/// Resolves and validates a recipe; `Err` holds every problem found.
pub fn load(path: &Path, sets: &[String]) -> Result<(Recipe, Resolved), Vec<String>> {
    load_inner(path, sets, false)
}

/// One point of a sweep file: the file's recipe (its `[sweep]` grid ignored) with the point's `sets`.
pub fn load_point(path: &Path, sets: &[String]) -> Result<(Recipe, Resolved), Vec<String>> {
    load_inner(path, sets, true)
}

fn load_inner(
    path: &Path,
    sets: &[String],
    sweep_ok: bool,
) -> Result<(Recipe, Resolved), Vec<String>> {
    let r = resolve::resolve(path, sets).map_err(|e| vec![e.to_string()])?;
    if r.sweep.is_some() && !sweep_ok {
        return Err(vec![format!(
            "{}: this is a sweep file (it has a [sweep] grid): run it with `mitune sweep {}`",
            path.display(),
            path.display()
        )]);
    }
    let mut errs = vec![];
    let t = r.table.clone();
    for k in t.keys() {
        if !TOP.contains(&k.as_str()) {
            errs.push(problem(
                &r,
                k,
                format!("unknown key (known: {})", TOP.join(", ")),
            ));
        }
    }
    let get = |k: &str| t.get(k).cloned();
    let name: Option<String> = match get("name") {
        Some(v) => section(&r, "name", v, &mut errs),
        None => {
            errs.push(problem(&r, "name", "missing: every recipe names its run"));
            None
        }
    };
    let seed: Option<u64> = get("seed").map_or(Some(0), |v| section(&r, "seed", v, &mut errs));
    let pipeline: Option<Vec<String>> = match get("pipeline") {
        Some(v) => section(&r, "pipeline", v, &mut errs),
        None => {
            errs.push(problem(
                &r,
                "pipeline",
                "missing: list the stages to run in order",
            ));
            None
        }
    };
    let output = get("output").map_or(Some("checkpoints/runs".into()), |v| {
        section(&r, "output", v, &mut errs)
    });
    let prepare: Option<Vec<Prepare>> =
        get("prepare").map_or(Some(vec![]), |v| section(&r, "prepare", v, &mut errs));
    let model: Option<ModelSpec> = match get("model") {
        Some(v) => section(&r, "model", v, &mut errs),
        None => {
            errs.push(problem(&r, "model", "missing [model] section"));
            None
        }
    };
    let heldout: Option<Option<Heldout>> = match get("heldout") {
        Some(v) => section(&r, "heldout", v, &mut errs).map(Some),
        None => Some(None),
    };
    let mut stages = std::collections::BTreeMap::new();
    match t.get("stages").and_then(|s| s.as_table()) {
        Some(tab) => {
            for (k, v) in tab {
                if let Some(s) = stage(&r, k, v, &mut errs) {
                    stages.insert(k.clone(), s);
                }
            }
        }
        None => errs.push(problem(&r, "stages", "missing [stages.<name>] tables")),
    }
    let (
        Some(name),
        Some(seed),
        Some(pipeline),
        Some(output),
        Some(prepare),
        Some(model),
        Some(heldout),
    ) = (name, seed, pipeline, output, prepare, model, heldout)
    else {
        return Err(errs.iter().map(|p| p.to_string()).collect());
    };
    let raw_stages: Vec<String> = t
        .get("stages")
        .and_then(|s| s.as_table())
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default();
    let recipe = Recipe {
        name,
        seed,
        pipeline,
        output,
        prepare,
        model,
        stages,
        heldout,
    };
    cross_check(&recipe, &r, &raw_stages, &mut errs);
    if errs.is_empty() {
        Ok((recipe, r))
    } else {
        Err(errs.iter().map(|p| p.to_string()).collect())
    }
}

/// Checks between fields: stage names, init references, batch arithmetic, model sources, paths.
fn cross_check(rc: &Recipe, r: &Resolved, raw_stages: &[String], errs: &mut Vec<Problem>) {
    let prepared: Vec<&Path> = rc
        .prepare
        .iter()
        .map(|p| match p {
            Prepare::Shapes { out, .. } => out.as_path(),
        })
        .collect();
    // A path is fine when it exists or a `prepare` entry will generate it.
    let exists = |p: &Path| p.exists() || prepared.iter().any(|d| p.starts_with(d));
    if rc.pipeline.is_empty() {
        errs.push(problem(r, "pipeline", "empty: name at least one stage"));
    }
    for (i, name) in rc.pipeline.iter().enumerate() {
        let Some(stage) = rc.stages.get(name) else {
            // A table that failed to parse has its own error already.
            if !raw_stages.contains(name) {
                errs.push(problem(
                    r,
                    "pipeline",
                    format!("stage {name:?} has no [stages.{name}] table"),
                ));
            }
            continue;
        };
        let key = format!("stages.{name}");
        if let Some(init) = stage.init() {
            match (&init.from_stage, &init.checkpoint) {
                (Some(from), None) => {
                    if rc.stages.get(from).is_some_and(|s| !s.trains()) {
                        errs.push(problem(
                            r,
                            &format!("{key}.init.from_stage"),
                            format!("{from:?} is an eval stage: it makes no model to start from"),
                        ));
                    } else if !rc.pipeline[..i].contains(from) {
                        errs.push(problem(
                            r,
                            &format!("{key}.init.from_stage"),
                            format!(
                                "{from:?} is not a stage earlier in the pipeline ({})",
                                rc.pipeline[..i].join(", ")
                            ),
                        ));
                    }
                }
                (None, Some(dir)) => {
                    // A stage model of another run (under the runs folder) may not exist yet: that run makes it.
                    if !dir.exists() && dir.starts_with(&rc.output) {
                        eprintln!(
                            "note: {key}.init.checkpoint {} does not exist yet: run the recipe that makes it first",
                            dir.display()
                        );
                    } else if !dir.join("config.json").exists() {
                        errs.push(problem(
                            r,
                            &format!("{key}.init.checkpoint"),
                            format!("{} has no config.json", dir.display()),
                        ));
                    }
                }
                _ => errs.push(problem(
                    r,
                    &format!("{key}.init"),
                    "give exactly one of from_stage or checkpoint",
                )),
            }
        }
        // what the stage trains, at which rates and how often it logs and saves: checked here, not when the
        // stage starts (a zero `save_every` would otherwise stop it at its first step)
        if let Some(st) = stage.steps() {
            let head = matches!(stage, StageSpec::Reward(_) | StageSpec::Ppo(_));
            check_trained(&st, head, &key, r, errs);
        }
        // `eval_every` evaluates the stage's `heldout` set: without one it would do nothing
        let held = match stage {
            StageSpec::Dpo(p) | StageSpec::Reward(p) => Some((p.eval_every, p.heldout.is_some())),
            StageSpec::Grpo(g) | StageSpec::Ppo(g) => Some((g.eval_every, g.heldout.is_some())),
            StageSpec::Kto(k) => Some((k.eval_every, k.heldout.is_some())),
            StageSpec::Align(_)
            | StageSpec::Instruct(_)
            | StageSpec::Pretrain(_)
            | StageSpec::Eval(_) => None,
        };
        if let Some((Some(_), false)) = held {
            errs.push(problem(
                r,
                &format!("{key}.eval_every"),
                "needs a held-out set to evaluate: add heldout = { sources = [...] } to the stage",
            ));
        }
        let t = match stage {
            StageSpec::Eval(e) => {
                check_eval(e, &key, r, &exists, errs);
                continue;
            }
            StageSpec::Dpo(p) => {
                check_pref(p, &key, r, &exists, errs);
                continue;
            }
            StageSpec::Grpo(g) => {
                for (k, set) in [
                    ("gamma", g.gamma.is_some()),
                    ("lam", g.lam.is_some()),
                    ("vf_coef", g.vf_coef.is_some()),
                ] {
                    if set {
                        errs.push(problem(
                            r,
                            &format!("{key}.{k}"),
                            "a PPO setting: GRPO has no value model",
                        ));
                    }
                }
                if g.group < 2 {
                    errs.push(problem(
                        r,
                        &format!("{key}.group"),
                        format!("{}: group-normalised advantages need at least 2 completions per prompt", g.group),
                    ));
                }
                check_rl(rc, g, i, &key, r, &exists, errs);
                continue;
            }
            StageSpec::Ppo(g) => {
                for (k, set) in [
                    ("loss_type", g.loss_type.is_some()),
                    ("epsilon_high", g.epsilon_high.is_some()),
                    (
                        "importance_sampling_level",
                        g.importance_sampling_level.is_some(),
                    ),
                    ("scale_rewards", g.scale_rewards.is_some()),
                    ("dynamic_sampling", g.dynamic_sampling.is_some()),
                ] {
                    if set {
                        errs.push(problem(
                            r,
                            &format!("{key}.{k}"),
                            "a GRPO setting: PPO averages its clipped surrogate and value loss over the completion tokens, with GAE advantages whitened over the batch",
                        ));
                    }
                }
                check_rl(rc, g, i, &key, r, &exists, errs);
                continue;
            }
            StageSpec::Reward(p) => {
                for (k, set) in [
                    ("loss", p.loss.is_some()),
                    ("reference", p.reference.is_some()),
                ] {
                    if set {
                        errs.push(problem(
                            r,
                            &format!("{key}.{k}"),
                            "a reward stage trains with the Bradley-Terry loss and no reference: drop it",
                        ));
                    }
                }
                check_pref(p, &key, r, &exists, errs);
                continue;
            }
            StageSpec::Kto(k) => {
                check_kto(k, &key, r, &exists, errs);
                continue;
            }
            StageSpec::Align(t) | StageSpec::Instruct(t) | StageSpec::Pretrain(t) => t,
        };
        if t.batch.micro == 0 || t.batch.global % t.batch.micro != 0 {
            errs.push(problem(
                r,
                &format!("{key}.batch"),
                format!(
                    "global {} must be a positive multiple of micro {}",
                    t.batch.global, t.batch.micro
                ),
            ));
        }
        if t.data.sources.is_empty() {
            errs.push(problem(
                r,
                &format!("{key}.data.sources"),
                "empty: give at least one source",
            ));
        }
        for (j, s) in t
            .data
            .sources
            .iter()
            .chain(t.eval.iter().flat_map(|e| e.data.sources.iter()))
            .enumerate()
        {
            let path = source_path(s);
            if !exists(path) {
                errs.push(problem(
                    r,
                    &format!("{key}.data.sources"),
                    format!("source {j}: {} does not exist", path.display()),
                ));
            }
        }
        if let Some(a) = &t.adapter {
            check_adapter(a, t.train.as_deref(), &key, r, errs);
        }
    }
    for name in rc.stages.keys() {
        if !rc.pipeline.contains(name) {
            eprintln!("note: stages.{name} is defined but not in the pipeline");
        }
    }
    let m = &rc.model;
    if let Some(dir) = &m.from {
        if m.encoder.is_some() || m.llm.is_some() || m.connector.is_some() {
            errs.push(problem(
                r,
                "model.from",
                "a whole checkpoint excludes [model.encoder]/[model.llm]/[model.connector]",
            ));
        }
        if !dir.exists() && dir.starts_with(&rc.output) {
            // a stage model of another run: that run makes it
            eprintln!(
                "note: model.from {} does not exist yet: run the recipe that makes it first",
                dir.display()
            );
        } else if !dir.join("config.json").exists() {
            errs.push(problem(
                r,
                "model.from",
                format!("{} has no config.json", dir.display()),
            ));
        }
    } else {
        if m.encoder.is_none() {
            errs.push(problem(r, "model.encoder", "missing (or give model.from)"));
        }
        if m.llm.is_none() {
            errs.push(problem(r, "model.llm", "missing (or give model.from)"));
        }
    }
    for (key, w) in [
        (
            "model.encoder.weights",
            m.encoder.as_ref().and_then(|e| e.weights.as_ref()),
        ),
        (
            "model.llm.weights",
            m.llm.as_ref().and_then(|l| l.weights.as_ref()),
        ),
        (
            "model.llm.tokenizer",
            m.llm.as_ref().and_then(|l| l.tokenizer.as_ref()),
        ),
    ] {
        if let Some(w) = w
            && !exists(w)
        {
            errs.push(problem(r, key, format!("{} does not exist", w.display())));
        }
    }
    if let Some(h) = &rc.heldout {
        for (i, t) in h.tasks.iter().enumerate() {
            if !exists(&t.path) {
                errs.push(problem(
                    r,
                    "heldout.tasks",
                    format!("task {i} ({}): {} does not exist", t.name, t.path.display()),
                ));
            }
        }
    }
}

/// `train` entries are parts or valid `re:<regex>` (`head` only where the stage has one); `optim.part_lr` keys
/// are parts; the numbers every training stage shares are in range.
fn check_trained(st: &schema::Steps, head: bool, key: &str, r: &Resolved, errs: &mut Vec<Problem>) {
    let part_ok = |p: &str| Part::parse(p).is_some_and(|p| head || p != Part::Head);
    let parts = if head {
        "encoder, connector, llm, head"
    } else {
        "encoder, connector, llm"
    };
    let mut bad = |k: &str, m: String| errs.push(problem(r, &format!("{key}.{k}"), m));
    if st.precision == schema::Precision::Bf16 && st.frozen_dtype == Some(schema::FrozenDtype::F32)
    {
        bad(
            "frozen_dtype",
            "precision = \"bf16\" stores frozen weights in bf16; for bf16 products over f32 frozen weights use \
             precision = \"bf16-mixed\""
                .into(),
        );
    }
    for p in st.train.unwrap_or_default() {
        match p.strip_prefix("re:") {
            Some(re) => {
                if let Err(e) = regex::Regex::new(re) {
                    bad("train", format!("{p:?} is not a valid regex: {e}"));
                }
            }
            None if !part_ok(p) => bad("train", format!("{p:?}: use {parts} or re:<regex>")),
            None => {}
        }
    }
    let schema::Optim::Adamw {
        lr,
        betas,
        eps,
        weight_decay,
        part_lr,
    } = st.optim;
    for (k, v) in part_lr {
        if !part_ok(k) {
            bad(
                &format!("optim.part_lr.{k}"),
                format!("not a part ({parts})"),
            );
        }
        if !(v.is_finite() && *v >= 0.0) {
            bad(
                &format!("optim.part_lr.{k}"),
                format!("{v}: a learning rate is a finite number >= 0"),
            );
        }
    }
    if !(lr.is_finite() && *lr >= 0.0) {
        bad("optim.lr", format!("{lr}: must be a finite number >= 0"));
    }
    for (i, b) in betas.iter().enumerate() {
        if !(0.0..1.0).contains(b) {
            bad(
                &format!("optim.betas[{i}]"),
                format!("{b}: must be in [0, 1)"),
            );
        }
    }
    if !(eps.is_finite() && *eps > 0.0) {
        bad("optim.eps", format!("{eps}: must be a finite number > 0"));
    }
    if !(weight_decay.is_finite() && *weight_decay >= 0.0) {
        bad(
            "optim.weight_decay",
            format!("{weight_decay}: must be a finite number >= 0"),
        );
    }
    use schema::Schedule as S;
    if let S::Linear { warmup_ratio, .. } | S::WarmupCosine { warmup_ratio, .. } = st.schedule
        && !(0.0..=1.0).contains(warmup_ratio)
    {
        bad(
            "schedule.warmup_ratio",
            format!("{warmup_ratio}: must be in [0, 1]"),
        );
    }
    if let S::WarmupCosine { min_lr_ratio, .. } = st.schedule
        && !(0.0..=1.0).contains(min_lr_ratio)
    {
        bad(
            "schedule.min_lr_ratio",
            format!("{min_lr_ratio}: must be in [0, 1]"),
        );
    }
    if !(st.clip_grad_norm.is_finite() && st.clip_grad_norm >= 0.0) {
        bad(
            "clip_grad_norm",
            format!(
                "{}: must be a finite number >= 0 (0 = off)",
                st.clip_grad_norm
            ),
        );
    }
    if st.max_steps.is_none() && !(st.epochs.is_finite() && st.epochs > 0.0) {
        bad(
            "epochs",
            format!("{}: must be a finite number > 0", st.epochs),
        );
    }
    if st.max_steps == Some(0) {
        bad("max_steps", "0: must be at least 1".into());
    }
    for (k, v) in [
        ("log_every", st.log_every),
        ("save_every", st.save_every),
        ("keep_last", st.keep_last),
    ] {
        if v == 0 {
            bad(k, "0: must be at least 1".into());
        }
    }
    if st.max_len < 2 {
        bad("max_len", format!("{}: must be at least 2", st.max_len));
    }
    if st.eval_every == Some(0) {
        bad("eval_every", "0: must be at least 1".into());
    }
}

/// What can be said of an adapter without the model (its targets are matched against the model at `train`).
fn check_adapter(
    a: &schema::Adapter,
    train: Option<&[String]>,
    key: &str,
    r: &Resolved,
    errs: &mut Vec<Problem>,
) {
    let f = a;
    let key = format!("{key}.adapter");
    if f.rank == 0 {
        errs.push(problem(r, &format!("{key}.rank"), "must be at least 1"));
    }
    if f.alpha.is_nan() || f.alpha <= 0.0 {
        errs.push(problem(r, &format!("{key}.alpha"), "must be positive"));
    }
    if f.dropout != 0.0 {
        errs.push(problem(
            r,
            &format!("{key}.dropout"),
            format!(
                "{}: adapter dropout is not implemented yet (the adapters are trained without it); use 0.0",
                f.dropout
            ),
        ));
    }
    if f.targets.is_empty() {
        errs.push(problem(
            r,
            &format!("{key}.targets"),
            "empty: name modules (q_proj, v_proj, ...) or give re:<regex>",
        ));
    }
    for t in &f.targets {
        if let Some(re) = t.strip_prefix("re:")
            && let Err(e) = regex::Regex::new(re)
        {
            errs.push(problem(
                r,
                &format!("{key}.targets"),
                format!("{t:?} is not a valid regex: {e}"),
            ));
        }
    }
    for p in &f.parts {
        if Part::parse(p).is_none_or(|p| p == Part::Head) {
            errs.push(problem(
                r,
                &format!("{key}.parts"),
                format!("{p:?}: use encoder, connector or llm"),
            ));
        }
    }
    if let Some(b) = f.bits
        && b != 8
        && b != 4
    {
        errs.push(problem(
            r,
            &format!("{key}.bits"),
            format!("{b}: use 8 or 4"),
        ));
    }
    for p in train.unwrap_or_default() {
        if p.starts_with("re:") {
            errs.push(problem(
                r,
                &key,
                format!("with an adapter, `train` names whole parts (saved as PEFT modules_to_save), not {p:?}"),
            ));
        } else if f.parts.contains(p) {
            errs.push(problem(
                r,
                &format!("{key}.parts"),
                format!("{p:?} is both fully trained (`train`) and adapted: drop it from `train` (the adapter trains it)"),
            ));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_rl(
    rc: &Recipe,
    g: &schema::RlStage,
    i: usize,
    key: &str,
    r: &Resolved,
    exists: &dyn Fn(&Path) -> bool,
    errs: &mut Vec<Problem>,
) {
    use schema::RewardSpec;
    let mut bad = |k: &str, m: String| errs.push(problem(r, &format!("{key}.{k}"), m));
    if g.group == 0 {
        bad("group", "must be at least 1".into());
    }
    if g.kl_beta < 0.0 {
        bad("kl_beta", format!("{} must be >= 0", g.kl_beta));
    }
    if !(g.clip_eps > 0.0 && g.clip_eps < 1.0) {
        bad("clip_eps", format!("{} must be in (0, 1)", g.clip_eps));
    }
    if g.updates == 0 {
        bad("updates", "must be at least 1".into());
    }
    if let Some(e) = g.epsilon_high
        && !(e > 0.0 && e.is_finite())
    {
        bad("epsilon_high", format!("{e} must be positive"));
    }
    for (k, m) in g.sampling.problems() {
        bad(&format!("sampling.{k}"), m);
    }
    if g.batch.micro == 0 || g.batch.global % g.batch.micro != 0 {
        bad(
            "batch",
            format!(
                "global {} must be a positive multiple of micro {} (in prompts)",
                g.batch.global, g.batch.micro
            ),
        );
    }
    if g.rewards.is_empty() {
        bad(
            "rewards",
            "empty: name at least one reward (exact_match, yes_no, format, iou, command, model)"
                .into(),
        );
    }
    for (j, w) in g.rewards.iter().enumerate() {
        match w {
            RewardSpec::Format { pattern, .. } => {
                if let Err(e) = regex::Regex::new(pattern) {
                    bad("rewards", format!("reward {j}: pattern {pattern:?}: {e}"));
                }
            }
            RewardSpec::Iou {
                threshold: Some(t), ..
            } if !(*t > 0.0 && *t <= 1.0) => {
                bad(
                    "rewards",
                    format!("reward {j}: threshold {t} must be in (0, 1]"),
                );
            }
            RewardSpec::Command {
                command, timeout_s, ..
            } => {
                if let Some(prog) = command.first()
                    && prog.contains('/')
                    && !exists(Path::new(prog))
                {
                    bad(
                        "rewards",
                        format!("reward {j}: command {prog} does not exist"),
                    );
                }
                if command.is_empty() || command[0].trim().is_empty() {
                    bad(
                        "rewards",
                        format!(
                            "reward {j}: command is empty: name a program, e.g. [\"python3\", \"score.py\"]"
                        ),
                    );
                }
                if !(*timeout_s > 0.0 && timeout_s.is_finite()) {
                    bad(
                        "rewards",
                        format!("reward {j}: timeout_s {timeout_s} must be positive"),
                    );
                }
            }
            RewardSpec::Model {
                from_stage, path, ..
            } => match (from_stage, path) {
                (Some(s), None) => {
                    if !matches!(rc.stages.get(s), Some(StageSpec::Reward(_)))
                        || !rc.pipeline[..i].contains(s)
                    {
                        bad(
                            "rewards",
                            format!(
                                "reward {j}: {s:?} is not a reward stage earlier in the pipeline"
                            ),
                        );
                    }
                }
                (None, Some(p)) => {
                    if !p.join("score.safetensors").exists() {
                        bad(
                            "rewards",
                            format!(
                                "reward {j}: {} has no score.safetensors (not a reward model)",
                                p.display()
                            ),
                        );
                    }
                }
                _ => bad(
                    "rewards",
                    format!("reward {j}: give exactly one of from_stage or path"),
                ),
            },
            _ => {}
        }
    }
    for (j, s) in g
        .data
        .sources
        .iter()
        .chain(g.heldout.iter().flat_map(|h| h.sources.iter()))
        .enumerate()
    {
        if !exists(&s.path) {
            bad(
                "data.sources",
                format!("source {j}: {} does not exist", s.path.display()),
            );
        }
    }
    if g.data.sources.is_empty() {
        bad("data.sources", "empty: give at least one source".into());
    }
    if let Some(a) = &g.adapter {
        check_adapter(a, g.train.as_deref(), key, r, errs);
    }
}

fn check_pref(
    p: &schema::PrefStage,
    key: &str,
    r: &Resolved,
    exists: &dyn Fn(&Path) -> bool,
    errs: &mut Vec<Problem>,
) {
    let loss = p.loss.unwrap_or_default();
    if let Some(m) = loss.check() {
        errs.push(problem(r, &format!("{key}.loss"), m));
    }
    if p.reference == Some(schema::Reference::Cached) && !loss.needs_reference() {
        errs.push(problem(
            r,
            &format!("{key}.reference"),
            "this loss is reference-free (simpo, orpo): drop `reference`",
        ));
    }
    if p.batch.micro == 0 || p.batch.global % p.batch.micro != 0 {
        errs.push(problem(
            r,
            &format!("{key}.batch"),
            format!(
                "global {} must be a positive multiple of micro {} (in pairs)",
                p.batch.global, p.batch.micro
            ),
        ));
    }
    if p.max_len < 2 {
        errs.push(problem(r, &format!("{key}.max_len"), "must be at least 2"));
    }
    if p.data.sources.is_empty() {
        errs.push(problem(
            r,
            &format!("{key}.data.sources"),
            "empty: give at least one source",
        ));
    }
    for (j, s) in p
        .data
        .sources
        .iter()
        .chain(p.heldout.iter().flat_map(|h| h.sources.iter()))
        .enumerate()
    {
        if !exists(&s.path) {
            errs.push(problem(
                r,
                &format!("{key}.data.sources"),
                format!("source {j}: {} does not exist", s.path.display()),
            ));
        }
    }
    if let Some(a) = &p.adapter {
        check_adapter(a, p.train.as_deref(), key, r, errs);
    }
}

fn check_kto(
    k: &schema::KtoStage,
    key: &str,
    r: &Resolved,
    exists: &dyn Fn(&Path) -> bool,
    errs: &mut Vec<Problem>,
) {
    let mut bad = |k: &str, m: String| errs.push(problem(r, &format!("{key}.{k}"), m));
    if k.batch.micro < 2 || k.batch.global % k.batch.micro != 0 {
        bad(
            "batch",
            format!(
                "global {} must be a multiple of micro {}, and micro at least 2 (KTO's KL baseline pairs each \
                 prompt with another example's completion of the micro-batch)",
                k.batch.global, k.batch.micro
            ),
        );
    }
    if !(k.beta > 0.0 && k.beta.is_finite()) {
        bad("beta", format!("{} must be positive", k.beta));
    }
    for (name, w) in [
        ("desirable_weight", k.desirable_weight),
        ("undesirable_weight", k.undesirable_weight),
    ] {
        if !(w >= 0.0 && w.is_finite()) {
            bad(name, format!("{w} must be >= 0"));
        }
    }
    if k.max_len < 2 {
        bad("max_len", "must be at least 2".into());
    }
    if k.data.sources.is_empty() {
        bad("data.sources", "empty: give at least one source".into());
    }
    for (j, s) in k
        .data
        .sources
        .iter()
        .chain(k.heldout.iter().flat_map(|h| h.sources.iter()))
        .enumerate()
    {
        if !exists(&s.path) {
            bad(
                "data.sources",
                format!("source {j}: {} does not exist", s.path.display()),
            );
        }
    }
    if let Some(a) = &k.adapter {
        check_adapter(a, k.train.as_deref(), key, r, errs);
    }
}

fn check_eval(
    e: &schema::EvalStage,
    key: &str,
    r: &Resolved,
    exists: &dyn Fn(&Path) -> bool,
    errs: &mut Vec<Problem>,
) {
    if e.tasks.is_empty() {
        errs.push(problem(
            r,
            &format!("{key}.tasks"),
            "empty: give at least one task",
        ));
    }
    if e.batch_size == 0 {
        errs.push(problem(
            r,
            &format!("{key}.batch_size"),
            "must be at least 1",
        ));
    }
    for (i, t) in e.tasks.iter().enumerate() {
        for p in [Some(&t.data), t.demos.as_ref()].into_iter().flatten() {
            if !exists(p) {
                errs.push(problem(
                    r,
                    &format!("{key}.tasks"),
                    format!("task {i} ({}): {} does not exist", t.label(), p.display()),
                ));
            }
        }
    }
}

pub fn source_path(s: &schema::Source) -> &Path {
    use schema::Source::*;
    match s {
        LlavaJson { path, .. }
        | Messages { path, .. }
        | Captions { path, .. }
        | Vqa { path, .. }
        | Text { path, .. } => path,
    }
}
