//! Ablation sweeps: a sweep file is a recipe (usually `extends = "base.toml"` plus a few changes) with a `[sweep]`
//! grid. Every key of the grid is a recipe key path with a list of values; the points are the cartesian product,
//! except that keys named together in `zip = [["a.b", "c.d"], ...]` vary together (equal-length lists), and
//! `seeds = [0, 1, 2]` repeats every point with the recipe's `seed`. Each point is the recipe with `--set` of its
//! values (so a key that is not in the recipe is the same located error as a bad `--set`) and its own run
//! directory, named from its values.
//!
//! ```toml
//! extends = "../quickstart.toml"
//! name = "connector"
//! [sweep]
//! "model.connector.depth" = [1, 2]
//! "stages.instruct.optim.lr" = [1e-3, 5e-4]
//! seeds = [0, 1]
//! ```
use toml::{Table, Value};

/// One point of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Run-directory-safe name, e.g. `depth=1_lr=0.001_seed=0`.
    pub name: String,
    /// `key=value` overrides, in grid order.
    pub sets: Vec<String>,
}

/// The value as TOML writes it in a `--set` (strings quoted, tables inline).
fn literal(v: &Value) -> String {
    match v {
        Value::Table(t) => {
            let inner: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{k} = {}", literal(v)))
                .collect();
            format!("{{ {} }}", inner.join(", "))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(literal).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// A short, path-safe rendering of a value for point names. A table is named by its `kind`, plus the fields
/// that tell it apart from the axis's other tables of the same kind (`resampler-latents-4`).
fn short(v: &Value, axis: &[Value]) -> String {
    let kind = |t: &Table| t.get("kind").and_then(Value::as_str).map(str::to_string);
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Table(t) => match kind(t) {
            Some(k) => {
                let same: Vec<&Table> = axis
                    .iter()
                    .filter_map(Value::as_table)
                    .filter(|o| kind(o).as_deref() == Some(k.as_str()))
                    .collect();
                let mut name = k;
                for (field, val) in t {
                    if field != "kind" && same.iter().any(|o| o.get(field) != Some(val)) {
                        name.push_str(&format!("-{field}-{}", literal(val)));
                    }
                }
                name
            }
            None => literal(v),
        },
        other => other.to_string(),
    };
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.+".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The shortest key-path suffix that tells an axis apart from the others (`stages.instruct.optim.lr` -> `lr`,
/// or `instruct.optim.lr` when another axis also ends in `lr`).
fn labels(keys: &[String]) -> Vec<String> {
    let suffix = |k: &str, n: usize| {
        let parts: Vec<&str> = k.split('.').collect();
        parts[parts.len().saturating_sub(n)..].join(".")
    };
    keys.iter()
        .map(|k| {
            let depth = k.split('.').count();
            let n = (1..=depth)
                .find(|&n| keys.iter().filter(|o| suffix(o, n) == suffix(k, n)).count() == 1)
                .unwrap_or(depth);
            suffix(k, n)
        })
        .collect()
}

/// Expands a `[sweep]` table into points; errors name the offending key.
pub fn expand(grid: &Table) -> Result<Vec<Point>, String> {
    let mut zips: Vec<Vec<String>> = vec![];
    if let Some(z) = grid.get("zip") {
        let groups = z.as_array().ok_or("sweep.zip: a list of lists of keys")?;
        for g in groups {
            let keys: Vec<String> = g
                .as_array()
                .ok_or("sweep.zip: a list of lists of keys")?
                .iter()
                .map(|k| {
                    k.as_str()
                        .map(str::to_string)
                        .ok_or("sweep.zip: keys are strings")
                })
                .collect::<Result<_, _>>()?;
            for k in &keys {
                if !grid.contains_key(k) {
                    return Err(format!("sweep.zip: {k:?} is not an axis of the grid"));
                }
            }
            zips.push(keys);
        }
    }
    // axes: (keys varying together, their value lists)
    let mut axes: Vec<(Vec<String>, Vec<Vec<Value>>)> = vec![];
    for (k, v) in grid {
        if k == "zip" {
            continue;
        }
        let vals = v
            .as_array()
            .ok_or_else(|| format!("sweep.{k:?}: a list of values"))?;
        if vals.is_empty() {
            return Err(format!("sweep.{k:?}: empty axis (give at least one value)"));
        }
        let key = if k == "seeds" {
            "seed".to_string()
        } else {
            k.clone()
        };
        let zipped = zips.iter().position(|z| z.contains(k));
        match zipped.and_then(|zi| axes.iter().position(|(ks, _)| zips[zi].contains(&ks[0]))) {
            Some(ai) => {
                let (ks, rows) = &mut axes[ai];
                if rows.len() != vals.len() {
                    return Err(format!(
                        "sweep.zip: {:?} has {} values but {:?} has {}; zipped axes need equal lengths",
                        ks[0],
                        rows.len(),
                        k,
                        vals.len()
                    ));
                }
                ks.push(key);
                for (r, v) in rows.iter_mut().zip(vals) {
                    r.push(v.clone());
                }
            }
            None => axes.push((vec![key], vals.iter().map(|v| vec![v.clone()]).collect())),
        }
    }
    // seeds last, so points of one configuration are neighbours
    axes.sort_by_key(|(ks, _)| ks[0] == "seed");
    let all_keys: Vec<String> = axes.iter().flat_map(|(ks, _)| ks.clone()).collect();
    let names = labels(&all_keys);
    let mut points = vec![Point {
        name: String::new(),
        sets: vec![],
    }];
    for (keys, rows) in &axes {
        let mut next = vec![];
        for p in &points {
            for row in rows {
                let mut q = p.clone();
                for (ki, (k, v)) in keys.iter().zip(row).enumerate() {
                    q.sets.push(format!("{k}={}", literal(v)));
                    let label = &names[all_keys.iter().position(|x| x == k).unwrap()];
                    if !q.name.is_empty() {
                        q.name.push('_');
                    }
                    let axis: Vec<Value> = rows.iter().map(|r| r[ki].clone()).collect();
                    q.name.push_str(&format!("{label}={}", short(v, &axis)));
                }
                next.push(q);
            }
        }
        points = next;
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = points.iter().find(|p| !seen.insert(p.name.as_str())) {
        return Err(format!(
            "sweep: two points would share the run directory {:?}; give the values of an axis distinct names",
            dup.name
        ));
    }
    Ok(points)
}

/// FNV-1a, 64 bits: a stable hash (std's hasher may change between releases, and keys are stored on disk).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// For each stage of `pipeline`, a key of everything that decides what the stages up to and including it produce
/// (the model section, seed, data preparation, held-out tasks and the stage tables in pipeline order; not the
/// run's name or output). Two points with equal keys at stage k can share one run of stages 0..=k.
pub fn prefix_keys(resolved: &Table, pipeline: &[String]) -> Vec<String> {
    let mut base = Table::new();
    for k in ["model", "seed", "prepare", "heldout"] {
        if let Some(v) = resolved.get(k) {
            base.insert(k.into(), v.clone());
        }
    }
    let stages = resolved.get("stages").and_then(Value::as_table);
    let mut prefix: Vec<Value> = vec![];
    pipeline
        .iter()
        .map(|name| {
            let mut entry = Table::new();
            entry.insert("name".into(), Value::String(name.clone()));
            if let Some(t) = stages.and_then(|s| s.get(name)) {
                entry.insert("spec".into(), t.clone());
            }
            prefix.push(Value::Table(entry));
            let mut t = base.clone();
            t.insert("stages".into(), Value::Array(prefix.clone()));
            format!("{:016x}", fnv1a(&toml::to_string(&t).unwrap_or_default()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(s: &str) -> Table {
        s.parse::<Table>().unwrap()
    }

    #[test]
    fn cartesian_product_with_seeds_last() {
        let p = expand(&grid(
            "\"model.connector.depth\" = [1, 2]\n\"stages.instruct.optim.lr\" = [1e-3, 5e-4]\nseeds = [0, 1]",
        ))
        .unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(p[0].name, "depth=1_lr=0.001_seed=0");
        assert_eq!(p[1].name, "depth=1_lr=0.001_seed=1");
        assert_eq!(
            p[7].sets,
            vec![
                "model.connector.depth=2",
                "stages.instruct.optim.lr=0.0005",
                "seed=1"
            ]
        );
    }

    #[test]
    fn tables_of_one_kind_are_named_by_what_differs() {
        let p = expand(&grid(
            "\"model.connector\" = [{ kind = \"mlp\", depth = 2 }, { kind = \"resampler\", latents = 4, depth = 2 }, \
             { kind = \"resampler\", latents = 16, depth = 2 }]",
        ))
        .unwrap();
        let names: Vec<&str> = p.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "connector=mlp",
                "connector=resampler-latents-4",
                "connector=resampler-latents-16"
            ]
        );
        // values that would still collide are an error, not two points writing one run directory
        let err = expand(&grid("\"a.b\" = [\"x y\", \"x-y\"]")).unwrap_err();
        assert!(err.contains("share the run directory"), "{err}");
    }

    #[test]
    fn zipped_axes_vary_together_and_names_disambiguate() {
        let p = expand(&grid(
            "\"stages.align.optim.lr\" = [1e-3, 2e-3]\n\"stages.instruct.optim.lr\" = [1e-4, 2e-4]\n\
             \"model.connector\" = [{ kind = \"linear\" }, { kind = \"mlp\", depth = 2 }]\n\
             zip = [[\"stages.align.optim.lr\", \"stages.instruct.optim.lr\"]]",
        ))
        .unwrap();
        assert_eq!(p.len(), 4);
        assert!(
            p.iter()
                .any(|x| x.name == "connector=mlp_align.optim.lr=0.002_instruct.optim.lr=0.0002"),
            "{p:?}"
        );
        assert!(
            p.iter().any(|x| x
                .sets
                .contains(&"model.connector={ depth = 2, kind = \"mlp\" }".to_string())),
            "{p:?}"
        );
    }

    #[test]
    fn prefix_keys_agree_up_to_the_first_differing_stage() {
        let r = |lr: f64, seed: i64| {
            format!(
                "name = \"x{lr}\"\nseed = {seed}\npipeline = [\"align\", \"instruct\"]\n[model]\nfrom = \"m\"\n\
                 [stages.align]\nkind = \"align\"\n[stages.instruct]\nkind = \"instruct\"\nlr = {lr}\n"
            )
            .parse::<Table>()
            .unwrap()
        };
        let p = ["align".to_string(), "instruct".to_string()];
        let (a, b, c) = (
            prefix_keys(&r(1e-3, 0), &p),
            prefix_keys(&r(2e-3, 0), &p),
            prefix_keys(&r(1e-3, 1), &p),
        );
        assert_eq!(a[0], b[0], "the name differs, align does not");
        assert_ne!(a[1], b[1]);
        assert_ne!(a[0], c[0], "another seed is another align run");
        assert_eq!(a, prefix_keys(&r(1e-3, 0), &p), "stable");
    }

    #[test]
    fn bad_grids_are_named() {
        assert!(
            expand(&grid("\"a.b\" = []"))
                .unwrap_err()
                .contains("empty axis")
        );
        assert!(
            expand(&grid("\"a.b\" = 3"))
                .unwrap_err()
                .contains("a list of values")
        );
        let e = expand(&grid("\"a\" = [1, 2]\n\"b\" = [1]\nzip = [[\"a\", \"b\"]]")).unwrap_err();
        assert!(e.contains("equal lengths"), "{e}");
        assert!(
            expand(&grid("\"a\" = [1]\nzip = [[\"a\", \"c\"]]"))
                .unwrap_err()
                .contains("not an axis")
        );
    }
}
