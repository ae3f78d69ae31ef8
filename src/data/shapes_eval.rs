//! Benchmark sets of the shapes world, in the layouts of the public benchmarks so `mitune eval` reads them with
//! the same loaders as the real ones: VQA (`question`, `answers`), multiple choice (ScienceQA-like `choices` +
//! `answer` index + `category`), POPE (`question_id`, `image`, `text`, `label`, JSON lines in `.json` files,
//! three negative samplings) and captions (several references per image). Held-in sets ask about training images
//! (the training distribution), held-out sets about the held-out images. Also `mc_train.json`, multiple-choice
//! instruction data in LLaVA layout, for recipes that teach the lettered-answer format.
//!
//! POPE negatives, as the POPE paper samples them, adapted to a world of (colour, shape) objects:
//! - random: any absent (colour, shape);
//! - popular: the absent pairs most frequent among training objects;
//! - adversarial: absent pairs that share a colour or a shape with an object in the image (POPE takes objects
//!   that co-occur with the present ones; here the confusable ones are those a model that does not bind colour
//!   to shape would call present).
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::shapes::{
    Colour, Kind, Object, POSITIONS, Shape, ask_one, caption, convo, image_rel, number, rng_for,
    write_atomic, write_json,
};
use crate::error::{Error, Result};

const MC_HINT: &str = "Answer with the option's letter from the given choices directly.";

fn jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}

/// A multiple-choice question: (category, question, choices, index of the answer).
fn mc(objs: &[Object], rng: &mut StdRng) -> (String, String, Vec<String>, usize) {
    let o = *objs.choose(rng).expect("every image has an object");
    let (cat, q, right, pool): (&str, String, String, Vec<String>) =
        match rng.random_range(0..4usize) {
            0 if objs.iter().filter(|p| p.shape == o.shape).count() == 1 => (
                "colour",
                format!("What colour is the {}?", o.shape.name()),
                o.colour.name().into(),
                Colour::ALL.iter().map(|c| c.name().to_string()).collect(),
            ),
            1 => (
                "shape",
                format!("Which shape is at the {}?", POSITIONS[o.cell]),
                o.shape.name().into(),
                Shape::ALL.iter().map(|s| s.name().to_string()).collect(),
            ),
            2 => (
                "count",
                "How many shapes are there?".into(),
                number(objs.len()).into(),
                (1..=4).map(|n| number(n).to_string()).collect(),
            ),
            _ if objs
                .iter()
                .filter(|p| (p.colour, p.shape) == (o.colour, o.shape))
                .count()
                == 1 =>
            {
                (
                    "position",
                    format!("Where is the {} {}?", o.colour.name(), o.shape.name()),
                    POSITIONS[o.cell].into(),
                    POSITIONS.iter().map(|p| p.to_string()).collect(),
                )
            }
            _ => (
                "count",
                "How many shapes are there?".into(),
                number(objs.len()).into(),
                (1..=4).map(|n| number(n).to_string()).collect(),
            ),
        };
    // three options: the answer and two distractors, shuffled
    let mut wrong: Vec<String> = pool.into_iter().filter(|p| *p != right).collect();
    wrong.shuffle(rng);
    let mut choices: Vec<String> = wrong.into_iter().take(2).collect();
    choices.push(right.clone());
    choices.shuffle(rng);
    let answer = choices.iter().position(|c| *c == right).unwrap();
    (cat.into(), q, choices, answer)
}

/// Reference captions: the canonical one, objects listed backwards, and a "there is" phrasing.
fn references(objs: &[Object]) -> Vec<String> {
    let canonical = caption(objs);
    let mut rev = objs.to_vec();
    rev.reverse();
    let parts: Vec<String> = rev
        .iter()
        .map(|o| {
            format!(
                "a {} {} at the {}",
                o.colour.name(),
                o.shape.name(),
                POSITIONS[o.cell]
            )
        })
        .collect();
    let backwards = match parts.len() {
        1 => format!("{}.", parts[0]),
        n => format!("{} and {}.", parts[..n - 1].join(", "), parts[n - 1]),
    };
    let there = format!("there is {}", canonical);
    vec![canonical, backwards, there]
}

type Pair = (Colour, Shape);

fn absent(objs: &[Object]) -> Vec<Pair> {
    Colour::ALL
        .iter()
        .flat_map(|&c| Shape::ALL.map(|s| (c, s)))
        .filter(|&(c, s)| !objs.iter().any(|o| (o.colour, o.shape) == (c, s)))
        .collect()
}

/// POPE's three ways of drawing absent objects.
const SAMPLINGS: [&str; 3] = ["random", "popular", "adversarial"];

/// POPE probes of one image for one sampling: up to three present objects, as many absent ones, alternating.
fn pope(objs: &[Object], sampling: &str, popular: &[Pair], rng: &mut StdRng) -> Vec<(Pair, bool)> {
    let mut present: Vec<Pair> = objs.iter().map(|o| (o.colour, o.shape)).collect();
    present.sort();
    present.dedup();
    present.shuffle(rng);
    present.truncate(3);
    let mut candidates = absent(objs);
    let negatives: Vec<Pair> = match sampling {
        "random" => {
            candidates.shuffle(rng);
            candidates
        }
        "popular" => popular
            .iter()
            .filter(|p| candidates.contains(p))
            .copied()
            .collect(),
        _ => {
            let confusable = |&(c, s): &Pair| objs.iter().any(|o| o.colour == c || o.shape == s);
            let (mut hard, mut rest): (Vec<Pair>, Vec<Pair>) =
                candidates.into_iter().partition(confusable);
            hard.shuffle(rng);
            rest.shuffle(rng);
            hard.extend(rest);
            hard
        }
    };
    present
        .iter()
        .zip(&negatives)
        .flat_map(|(&p, &n)| [(p, true), (n, false)])
        .collect()
}

/// A hallucinated variant of the caption: an extra object in an empty cell, a wrong colour, or a wrong shape.
fn hallucinated(objs: &[Object], rng: &mut StdRng) -> String {
    let mut bad = objs.to_vec();
    let empty: Vec<usize> = (0..4)
        .filter(|c| !objs.iter().any(|o| o.cell == *c))
        .collect();
    match rng.random_range(0..3usize) {
        0 if !empty.is_empty() => bad.push(Object {
            cell: *empty.choose(rng).unwrap(),
            shape: *Shape::ALL.choose(rng).unwrap(),
            colour: *Colour::ALL.choose(rng).unwrap(),
        }),
        1 => {
            let k = rng.random_range(0..bad.len());
            let others: Vec<Colour> = Colour::ALL
                .into_iter()
                .filter(|c| *c != bad[k].colour)
                .collect();
            bad[k].colour = *others.choose(rng).unwrap();
        }
        _ => {
            let k = rng.random_range(0..bad.len());
            let others: Vec<Shape> = Shape::ALL
                .into_iter()
                .filter(|s| *s != bad[k].shape)
                .collect();
            bad[k].shape = *others.choose(rng).unwrap();
        }
    }
    caption(&bad)
}

/// Preference pairs of one image (mitune's `pairs` layout): a yes/no probe (the faithful answer chosen, its
/// opposite rejected; half the probes ask about absent objects, POPE-style) and a caption against a hallucinated
/// one (an extra object, a wrong colour or a wrong shape). Absent objects are drawn by POPE's three samplings in
/// turn (image i: random, popular, adversarial for i mod 3): `yesno_train.json`, which the quickstart's instruct
/// stage learns from, has no popular negatives, so frequent objects are where its model says "yes" to absent
/// objects most, and these pairs are what corrects it.
fn preference_pairs(
    objs: &[Object],
    split: &str,
    i: usize,
    popular: &[Pair],
    rng: &mut StdRng,
) -> Vec<Value> {
    let img = image_rel(split, i);
    let sampling = SAMPLINGS[i % 3];
    let probes = pope(objs, sampling, popular, rng);
    let ((c, s), yes) = probes[rng.random_range(0..probes.len())];
    let (good, bad) = if yes { ("yes", "no") } else { ("no", "yes") };
    vec![
        json!({"id": format!("pref-{split}-{i:05}-probe"), "image": img, "kind": if yes { "present" } else { "absent" },
            "sampling": sampling,
            "prompt": format!("<image>\nIs there a {} {}?\n{}", c.name(), s.name(), super::shapes::YESNO_HINT),
            "chosen": good, "rejected": bad}),
        json!({"id": format!("pref-{split}-{i:05}-caption"), "image": img, "kind": "caption",
            "prompt": "<image>\nDescribe the image briefly.", "chosen": caption(objs),
            "rejected": hallucinated(objs, rng)}),
    ]
}

/// Writes `mc_train.json`, `preference_{train,heldout}.jsonl` (+ `preference_probes_*`: the probe pairs alone) and
/// `eval/{heldin,heldout}/*`.
pub fn write(out: &Path, seed: u64, train: &[Vec<Object>], held: &[Vec<Object>]) -> Result<()> {
    let mut mc_train = vec![];
    for (i, objs) in train.iter().enumerate() {
        let mut rng = rng_for(seed, "train", "mc", i);
        let (_, q, choices, answer) = mc(objs, &mut rng);
        let opts: Vec<String> = choices
            .iter()
            .enumerate()
            .map(|(k, c)| format!("{}. {c}", (b'A' + k as u8) as char))
            .collect();
        let prompt = format!("{q}\n{}\n{MC_HINT}", opts.join("\n"));
        let letter = ((b'A' + answer as u8) as char).to_string();
        mc_train.push(
            json!({"id": format!("mc-train-{i:05}"), "image": image_rel("train", i),
            "conversations": convo(&[(prompt, letter)], Some(true))}),
        );
    }
    write_json(&out.join("mc_train.json"), &Value::Array(mc_train))?;

    // popularity of (colour, shape) among training objects, most frequent first (ties in a fixed order)
    let mut freq: BTreeMap<Pair, usize> = BTreeMap::new();
    for o in train.iter().flatten() {
        *freq.entry((o.colour, o.shape)).or_default() += 1;
    }
    let mut popular: Vec<Pair> = freq.keys().copied().collect();
    popular.sort_by_key(|p| std::cmp::Reverse(freq[p]));
    for p in Colour::ALL.iter().flat_map(|&c| Shape::ALL.map(|s| (c, s))) {
        if !popular.contains(&p) {
            popular.push(p);
        }
    }

    for (split, set) in [("train", train), ("heldout", held)] {
        let rows: Vec<Value> = set
            .iter()
            .enumerate()
            .flat_map(|(i, objs)| {
                preference_pairs(
                    objs,
                    split,
                    i,
                    &popular,
                    &mut rng_for(seed, split, "preference", i),
                )
            })
            .collect();
        jsonl(&out.join(format!("preference_{split}.jsonl")), &rows)?;
        // the yes/no probe pairs alone (POPE-style faithfulness pairs without the caption pairs)
        let probes: Vec<Value> = rows
            .iter()
            .filter(|r| r["kind"] != "caption")
            .cloned()
            .collect();
        jsonl(
            &out.join(format!("preference_probes_{split}.jsonl")),
            &probes,
        )?;
        // verifiable-answer prompts for on-policy stages: one short question per image, with its answer
        let rows: Vec<Value> = set
            .iter()
            .enumerate()
            .filter_map(|(i, objs)| {
                let mut rng = rng_for(seed, split, "prompts", i);
                let mut kinds = Kind::SHORT.to_vec();
                kinds.push(Kind::YesNo);
                let qa = ask_one(&kinds, objs, &mut rng)?;
                Some(json!({"id": format!("prompt-{split}-{i:05}"), "image": image_rel(split, i),
                    "prompt": format!("<image>\n{}", qa.prompt()), "answer": qa.answer, "kind": qa.kind.name()}))
            })
            .collect();
        jsonl(&out.join(format!("prompts_{split}.jsonl")), &rows)?;
    }

    // yes/no probes of every training image (POPE-style: as many absent objects as present ones, negatives
    // sharing a colour or a shape with a present object half of the time), LLaVA layout
    let mut yesno = vec![];
    for (i, objs) in train.iter().enumerate() {
        let mut rng = rng_for(seed, "train", "yesno", i);
        let sampling = if i % 2 == 0 { "random" } else { "adversarial" };
        for (k, ((c, s), yes)) in pope(objs, sampling, &popular, &mut rng)
            .into_iter()
            .enumerate()
        {
            let q = format!(
                "Is there a {} {}?\n{}",
                c.name(),
                s.name(),
                super::shapes::YESNO_HINT
            );
            let a = if yes { "yes" } else { "no" }.to_string();
            yesno.push(
                json!({"id": format!("yesno-train-{i:05}-{k}"), "image": image_rel("train", i),
                "conversations": convo(&[(q, a)], Some(true))}),
            );
        }
    }
    write_json(&out.join("yesno_train.json"), &Value::Array(yesno))?;

    let n_heldin = held.len().min(train.len());
    for (name, split, set) in [
        ("heldin", "train", &train[..n_heldin]),
        ("heldout", "heldout", held),
    ] {
        let dir = out.join("eval").join(name);
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let (mut vqa, mut mcq, mut caps) = (vec![], vec![], vec![]);
        let mut popes: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for (i, objs) in set.iter().enumerate() {
            let img = format!("../../{}", image_rel(split, i));
            let mut rng = rng_for(seed, name, "eval-vqa", i);
            if let Some(qa) = ask_one(&Kind::SHORT, objs, &mut rng) {
                vqa.push(
                    json!({"question_id": i, "image": img, "question": qa.question,
                    "answers": [qa.answer], "category": qa.kind.name()}),
                );
            }
            let (cat, q, choices, answer) = mc(objs, &mut rng_for(seed, name, "eval-mc", i));
            mcq.push(
                json!({"id": format!("{name}-{i:05}"), "image": img, "question": q,
                "choices": choices, "answer": answer, "category": cat}),
            );
            caps.push(json!({"id": format!("{name}-{i:05}"), "image": img,
                "captions": references(objs)}));
            for sampling in SAMPLINGS {
                let mut rng = rng_for(seed, name, sampling, i);
                let rows = popes.entry(sampling).or_default();
                for ((c, s), yes) in pope(objs, sampling, &popular, &mut rng) {
                    rows.push(json!({"question_id": rows.len() + 1, "image": img,
                        "text": format!("Is there a {} {}?", c.name(), s.name()),
                        "label": if yes { "yes" } else { "no" }, "category": sampling}));
                }
            }
        }
        jsonl(&dir.join("vqa.jsonl"), &vqa)?;
        jsonl(&dir.join("mc.jsonl"), &mcq)?;
        jsonl(&dir.join("captions.jsonl"), &caps)?;
        for (sampling, rows) in popes {
            jsonl(&dir.join(format!("pope_{sampling}.json")), &rows)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(shape: Shape, colour: Colour, cell: usize) -> Object {
        Object {
            shape,
            colour,
            cell,
        }
    }

    #[test]
    fn pope_probes_alternate_and_negatives_are_absent() {
        let objs = [
            obj(Shape::Circle, Colour::Red, 0),
            obj(Shape::Square, Colour::Blue, 3),
        ];
        let popular: Vec<Pair> = Colour::ALL
            .iter()
            .flat_map(|&c| Shape::ALL.map(|s| (c, s)))
            .collect();
        for sampling in SAMPLINGS {
            let probes = pope(&objs, sampling, &popular, &mut rng_for(0, "t", sampling, 0));
            assert_eq!(probes.len(), 4, "{sampling}");
            for (k, ((c, s), yes)) in probes.iter().enumerate() {
                assert_eq!(*yes, k % 2 == 0);
                let there = objs.iter().any(|o| (o.colour, o.shape) == (*c, *s));
                assert_eq!(there, *yes, "{sampling}: {c:?} {s:?}");
            }
            if sampling == "adversarial" {
                // both negatives share a colour or a shape with a present object
                for ((c, s), _) in probes.iter().filter(|p| !p.1) {
                    assert!(objs.iter().any(|o| o.colour == *c || o.shape == *s));
                }
            }
        }
    }

    #[test]
    fn preference_probes_are_faithful_and_cycle_the_samplings() {
        let popular: Vec<Pair> = Colour::ALL
            .iter()
            .flat_map(|&c| Shape::ALL.map(|s| (c, s)))
            .collect();
        for i in 0..60 {
            let objs = super::super::shapes::objects(5, "train", i);
            let rows = preference_pairs(&objs, "train", i, &popular, &mut rng_for(5, "t", "p", i));
            let probe = &rows[0];
            assert_eq!(probe["sampling"], SAMPLINGS[i % 3]);
            // "<image>\nIs there a {colour} {shape}?\n..." — chosen is the truth about that object
            let q = probe["prompt"].as_str().unwrap();
            let words: Vec<&str> = q.split(['\n', ' ', '?']).collect();
            let at = words.iter().position(|w| *w == "a").unwrap();
            let there = objs
                .iter()
                .any(|o| o.colour.name() == words[at + 1] && o.shape.name() == words[at + 2]);
            assert_eq!(probe["chosen"], if there { "yes" } else { "no" }, "{q}");
            assert_eq!(probe["kind"], if there { "present" } else { "absent" });
            assert_ne!(probe["chosen"], probe["rejected"]);
        }
    }

    #[test]
    fn mc_answer_points_at_the_truth() {
        for i in 0..50 {
            let objs = super::super::shapes::objects(3, "train", i);
            let (cat, q, choices, answer) = mc(&objs, &mut rng_for(3, "t", "mc", i));
            assert_eq!(choices.len(), 3, "{q}");
            let right = &choices[answer];
            match cat.as_str() {
                "count" => assert_eq!(right, number(objs.len())),
                "colour" | "shape" | "position" => {
                    assert!(q.contains('?'));
                    let unique: std::collections::HashSet<_> = choices.iter().collect();
                    assert_eq!(unique.len(), 3);
                }
                other => panic!("category {other}"),
            }
        }
    }
}
