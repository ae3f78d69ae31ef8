//! The reward terms of the RL stages (grpo, ppo) and their weighted sum per rollout: rules on the completion's
//! text (`exact_match`, `yes_no`, `format`, `iou`), a reward model's score (`model`), and a program of the user's
//! (`command`).
//!
//! `command`: the program (run without a shell, in the working directory, once per micro-batch of rollouts) reads
//! one JSON object per rollout on stdin — `{"id", "prompt", "conversation": [{role, content}], "completion",
//! "answer", "images"}` — and writes one number per line on stdout, in the same order. It must exit 0 within
//! `timeout_s`; a non-zero exit, a timeout, a line that is not a finite number or a count that differs stops the
//! stage before any update is made with that step's rewards, with the command's stderr in the error (the last
//! checkpoint stays; `--resume` once the program is fixed).
use burn::tensor::Device;
use regex::Regex;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::Duration;
use wait_timeout::ChildExt;

use super::reward_model::{self, RewardModel};
use super::rollout::Rollout;
use crate::data::preference::PromptItem;
use crate::data::templates::Encoded;
use crate::error::{Error, Result};
use crate::eval::metrics;
use crate::model::Built;

pub use crate::recipe::schema::RewardSpec;

impl RewardSpec {
    pub fn weight(&self) -> f64 {
        match self {
            RewardSpec::ExactMatch { weight }
            | RewardSpec::YesNo { weight }
            | RewardSpec::Format { weight, .. }
            | RewardSpec::Iou { weight, .. }
            | RewardSpec::Command { weight, .. }
            | RewardSpec::Model { weight, .. } => *weight,
        }
    }

    /// The rule's reward of `completion` (None for the terms scored in batch: `model`, `command`).
    pub fn rule(&self, completion: &str, reference: Option<&str>) -> Result<Option<f64>> {
        let answer = completion.trim().lines().next().unwrap_or("").trim();
        Ok(match self {
            RewardSpec::ExactMatch { .. } => {
                Some(reference.map_or(0.0, |r| metrics::vqa_accuracy(answer, &[r.to_string()])))
            }
            RewardSpec::YesNo { .. } => Some(reference.map_or(0.0, |r| {
                let want = metrics::vqa_normalize(r) == "yes";
                f64::from(u8::from(metrics::pope_is_yes(answer) == want))
            })),
            RewardSpec::Format { pattern, .. } => {
                let re = Regex::new(pattern)
                    .map_err(|e| Error::input(format!("reward pattern {pattern:?}: {e}")))?;
                Some(f64::from(u8::from(re.is_match(completion.trim()))))
            }
            RewardSpec::Iou { threshold, .. } => {
                let iou = match (reference.and_then(first_box), first_box(completion)) {
                    (Some(want), Some(got)) => iou(want, got),
                    _ => 0.0,
                };
                Some(match threshold {
                    Some(t) => f64::from(u8::from(iou >= *t)),
                    None => iou,
                })
            }
            RewardSpec::Command { .. } | RewardSpec::Model { .. } => None,
        })
    }
}

/// The first four numbers of `text` as a box [x1, y1, x2, y2], whatever surrounds them: `[10, 20, 50, 60]`,
/// Qwen2.5-VL's `{"bbox_2d": [10, 20, 50, 60]}`, Qwen2-VL's `(10,20),(50,60)`, `<answer>10 20 50 60</answer>`.
pub fn first_box(text: &str) -> Option<[f64; 4]> {
    // whole numbers only: the 2 of `bbox_2d` is not a coordinate
    static NUMBER: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"-?\b\d+(?:\.\d+)?\b").expect("a valid pattern"));
    let v: Vec<f64> = NUMBER
        .find_iter(text)
        .take(4)
        .filter_map(|m| m.as_str().parse().ok())
        .collect();
    (v.len() == 4).then(|| [v[0], v[1], v[2], v[3]])
}

/// Intersection over union of two boxes [x1, y1, x2, y2]; 0 when either is empty or inverted.
pub fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let (aa, ab) = (area(a), area(b));
    if aa <= 0.0 || ab <= 0.0 {
        return 0.0;
    }
    let inter = area([
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    inter / (aa + ab - inter)
}

/// The reward models a stage names, loaded once: (term index, model).
pub fn reward_models(
    specs: &[RewardSpec],
    run: &Path,
    device: &Device,
) -> Result<Vec<(usize, RewardModel, Built)>> {
    let mut out = vec![];
    for (j, s) in specs.iter().enumerate() {
        if let RewardSpec::Model {
            from_stage, path, ..
        } = s
        {
            let dir = match (from_stage, path) {
                (Some(st), _) => run.join(st).join("model"),
                (_, Some(p)) => p.clone(),
                _ => return Err(Error::input("a model reward needs from_stage or path")),
            };
            let (rm, b) = reward_model::load(&dir, device)?;
            out.push((j, rm, b));
        }
    }
    Ok(out)
}

/// Weighted reward of every rollout (`models`: the loaded reward models; a `model` term without one counts 0).
pub fn rewards(
    specs: &[RewardSpec],
    models: &[(usize, RewardModel, Built)],
    rolls: &[Rollout],
    prompts: &[PromptItem],
    device: &Device,
) -> Result<Vec<f64>> {
    let mut total = vec![0.0; rolls.len()];
    for (j, s) in specs.iter().enumerate() {
        if let Some((_, rm, b)) = models.iter().find(|m| m.0 == j) {
            let rows: Vec<&Encoded> = rolls.iter().map(|r| &r.row).collect();
            for (k, chunk) in rows.chunks(16).enumerate() {
                for (i, v) in reward_model::score(rm, chunk, b, device)?
                    .into_iter()
                    .enumerate()
                {
                    total[k * 16 + i] += s.weight() * v as f64;
                }
            }
            continue;
        }
        if let RewardSpec::Command {
            command, timeout_s, ..
        } = s
        {
            let scores = run_command(command, *timeout_s, rolls, prompts)
                .map_err(|m| Error::input(format!("reward {j} (command {command:?}): {m}")))?;
            for (t, v) in total.iter_mut().zip(scores) {
                *t += s.weight() * v;
            }
            continue;
        }
        for (i, r) in rolls.iter().enumerate() {
            let v = s
                .rule(&r.text, prompts[r.prompt].answer.as_deref())?
                .unwrap_or(0.0);
            total[i] += s.weight() * v;
        }
    }
    Ok(total)
}

/// The JSON line a reward command reads for one rollout.
fn command_line(r: &Rollout, p: &PromptItem) -> String {
    let conversation: Vec<serde_json::Value> = p
        .history
        .iter()
        .map(|(role, c)| serde_json::json!({"role": role.as_str(), "content": c}))
        .collect();
    let prompt = p.history.last().map_or("", |(_, c)| c.as_str());
    serde_json::json!({
        "id": p.id,
        "prompt": prompt,
        "conversation": conversation,
        "completion": r.text,
        "answer": p.answer,
        "images": p.images,
    })
    .to_string()
}

/// The scores `command` prints for `rolls`, one per line, in order; Err with what went wrong, the rollouts' prompt
/// ids and the command's stderr.
fn run_command(
    command: &[String],
    timeout_s: f64,
    rolls: &[Rollout],
    prompts: &[PromptItem],
) -> std::result::Result<Vec<f64>, String> {
    let (prog, args) = command
        .split_first()
        .ok_or("the command is empty: name a program, e.g. [\"python3\", \"score.py\"]")?;
    let ids = || {
        let mut v: Vec<&str> = rolls
            .iter()
            .map(|r| prompts[r.prompt].id.as_str())
            .collect();
        v.dedup();
        format!("prompts {}", v.join(", "))
    };
    // its own process group, so a timeout kills what it started too (a shell's children hold the pipes open)
    let mut child = Command::new(prog)
        .args(args)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {prog:?}: {e} (check the program's path and that it is executable)"
            )
        })?;
    let input: String = rolls
        .iter()
        .map(|r| command_line(r, &prompts[r.prompt]) + "\n")
        .collect();
    // stdin written and the pipes drained on their own threads, so a program that writes before it has read
    // everything (or reads nothing) cannot deadlock against us
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || {
        // a program that exits without reading closes the pipe: not an error of ours, its exit status tells
        let _ = stdin.write_all(input.as_bytes());
    });
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let limit = Duration::from_secs_f64(timeout_s.max(0.0));
    let status = match child.wait_timeout(limit).map_err(|e| e.to_string())? {
        Some(s) => s,
        None => {
            // SAFETY: kill(2) on the process group created above; no memory is touched
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            let e = err.join().unwrap_or_default();
            return Err(format!(
                "no answer within timeout_s = {timeout_s} on the rollouts of {}; killed{}",
                ids(),
                tail(&e)
            ));
        }
    };
    let _ = writer.join();
    let (out, e) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if !status.success() {
        return Err(format!("{status} on the rollouts of {}{}", ids(), tail(&e)));
    }
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != rolls.len() {
        return Err(format!(
            "printed {} scores for {} rollouts (one number per line, in the order read) on {}{}",
            lines.len(),
            rolls.len(),
            ids(),
            tail(&e)
        ));
    }
    lines
        .iter()
        .zip(rolls)
        .enumerate()
        .map(|(k, (l, r))| match l.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(format!(
                "line {} of its output, {:?}, is not a finite number (the score of prompt {}'s rollout){}",
                k + 1,
                l.trim(),
                prompts[r.prompt].id,
                tail(&e)
            )),
        })
        .collect()
}

/// The last part of a command's stderr, for an error message.
fn tail(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        return String::new();
    }
    let cut = s.len().saturating_sub(2000);
    let start = (cut..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!("; its stderr: {}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::{RewardSpec, first_box, iou, rewards};
    use crate::data::preference::PromptItem;
    use crate::data::sources::Role;
    use crate::data::templates::Encoded;
    use crate::stages::rollout::Rollout;

    #[test]
    fn boxes_and_their_overlap() {
        assert_eq!(
            first_box("[10, 20, 50, 60]"),
            Some([10.0, 20.0, 50.0, 60.0])
        );
        assert_eq!(
            first_box("{\"bbox_2d\": [1.5, 2, 3, 4.25], \"label\": \"cat\"}"),
            Some([1.5, 2.0, 3.0, 4.25])
        );
        assert_eq!(first_box("(10,20),(50,60)"), Some([10.0, 20.0, 50.0, 60.0]));
        assert_eq!(first_box("a box: 1 2 3"), None);
        // [0,0,2,2] and [1,1,3,3]: intersection 1, union 4 + 4 − 1 = 7
        assert!((iou([0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]) - 1.0 / 7.0).abs() < 1e-12);
        assert_eq!(iou([0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]), 1.0);
        assert_eq!(iou([0.0, 0.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0]), 0.0);
        // inverted: no box
        assert_eq!(iou([2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]), 0.0);
        let r = |t| RewardSpec::Iou {
            threshold: t,
            weight: 1.0,
        };
        let want = Some("[0, 0, 2, 2]");
        assert!((r(None).rule("[1, 1, 3, 3]", want).unwrap().unwrap() - 1.0 / 7.0).abs() < 1e-12);
        assert_eq!(r(Some(0.5)).rule("[1, 1, 3, 3]", want).unwrap(), Some(0.0));
        assert_eq!(
            r(Some(0.5)).rule("[0, 0, 2, 1.5]", want).unwrap(),
            Some(1.0)
        );
        assert_eq!(r(None).rule("no box here", want).unwrap(), Some(0.0));
    }

    fn world(texts: &[&str]) -> (Vec<Rollout>, Vec<PromptItem>) {
        let prompts = vec![PromptItem {
            id: "p7".into(),
            images: vec!["img/a.png".into()],
            history: vec![(Role::User, "<image>\nHow many?".into())],
            answer: Some("3".into()),
        }];
        let rolls = texts
            .iter()
            .map(|t| Rollout {
                prompt: 0,
                row: Encoded {
                    index: 0,
                    ids: vec![],
                    labels: vec![],
                    images: vec![],
                    image_grids: vec![],
                    videos: vec![],
                    instructions: vec![],
                },
                text: t.to_string(),
                tokens: 1,
            })
            .collect();
        (rolls, prompts)
    }

    fn command(script: &str, timeout_s: f64) -> Vec<RewardSpec> {
        vec![RewardSpec::Command {
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_s,
            weight: 2.0,
        }]
    }

    #[test]
    fn a_command_scores_each_rollout_from_its_json_line() {
        let (rolls, prompts) = world(&["3", "three", "4"]);
        let device = burn::tensor::Device::flex();
        // the score: 1 when the completion equals the answer, read from the JSON line by the program
        let script = r#"while IFS= read -r l; do
            case "$l" in *'"completion":"3"'*'"answer":"3"'* | *'"answer":"3"'*'"completion":"3"'*) echo 1;;
            *'"id":"p7"'*) echo 0.25;; *) echo -1;; esac; done"#;
        let got = rewards(&command(script, 10.0), &[], &rolls, &prompts, &device).unwrap();
        assert_eq!(got, vec![2.0, 0.5, 0.5]);
    }

    #[test]
    fn a_broken_command_is_a_located_error_with_its_stderr() {
        let (rolls, prompts) = world(&["3", "4"]);
        let device = burn::tensor::Device::flex();
        let err = |script, t| {
            rewards(&command(script, t), &[], &rolls, &prompts, &device)
                .unwrap_err()
                .to_string()
        };
        let e = err("cat >/dev/null; echo 'no model file' >&2; exit 3", 10.0);
        assert!(
            e.contains("reward 0") && e.contains("exit status: 3"),
            "{e}"
        );
        assert!(e.contains("no model file") && e.contains("p7"), "{e}");
        let e = err("cat >/dev/null; echo 1; echo high", 10.0);
        assert!(
            e.contains("line 2") && e.contains("\"high\"") && e.contains("not a finite number"),
            "{e}"
        );
        let e = err("cat >/dev/null; echo 1", 10.0);
        assert!(e.contains("printed 1 scores for 2 rollouts"), "{e}");
        let t0 = std::time::Instant::now();
        let e = err("sleep 30", 0.3);
        assert!(e.contains("timeout_s = 0.3") && e.contains("killed"), "{e}");
        assert!(
            t0.elapsed().as_secs() < 10,
            "the hung command was not killed in time"
        );
        let e = rewards(
            &[RewardSpec::Command {
                command: vec!["/no/such/program".into()],
                timeout_s: 1.0,
                weight: 1.0,
            }],
            &[],
            &rolls,
            &prompts,
            &device,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot start") && e.contains("/no/such/program"),
            "{e}"
        );
    }
}
