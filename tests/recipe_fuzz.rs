//! Recipes mangled the ways hand edits mangle them — a key deleted, a value or table duplicated, a value of the
//! wrong type, a line pasted twice — give a located error or success from `mitune validate` (`sweep --dry-run`
//! for sweep files), never a panic. Every recipe in `recipes/`, mutations drawn from a fixed seed.
use std::path::{Path, PathBuf};
use std::process::Command;
use toml::{Table, Value};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A step into a TOML value: a table key or an array index.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn paths(v: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match v {
        Value::Table(t) => {
            for (k, x) in t {
                at.push(Step::Key(k.clone()));
                out.push(at.clone());
                paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(Step::Index(i));
                out.push(at.clone());
                paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// The container holding the last step of `path`.
fn parent<'a>(root: &'a mut Value, path: &[Step]) -> &'a mut Value {
    let mut v = root;
    for s in &path[..path.len() - 1] {
        v = match s {
            Step::Key(k) => v.as_table_mut().unwrap().get_mut(k).unwrap(),
            Step::Index(i) => &mut v.as_array_mut().unwrap()[*i],
        };
    }
    v
}

/// Values of the wrong type or out of range.
fn odd(r: &mut Lcg) -> Value {
    let pool: Vec<Value> = vec![
        Value::String(String::new()),
        Value::String("bogus".into()),
        Value::String("../../../../etc".into()),
        Value::Integer(0),
        Value::Integer(-1),
        Value::Integer(i64::MAX),
        Value::Integer(i64::MIN),
        Value::Float(f64::NAN),
        Value::Float(f64::INFINITY),
        Value::Float(-1e300),
        Value::Float(0.5),
        Value::Boolean(true),
        Value::Array(vec![]),
        Value::Array(vec![Value::Integer(1), Value::String("a".into())]),
        Value::Table(Table::new()),
        Value::Table(Table::from_iter([(
            "kind".to_string(),
            Value::String("bogus".into()),
        )])),
    ];
    pool[r.below(pool.len())].clone()
}

/// One mutation of `root`; returns what it did (for the failure message).
fn mutate(root: &mut Value, r: &mut Lcg) -> String {
    let mut all = vec![];
    paths(root, &mut vec![], &mut all);
    let path = all[r.below(all.len())].clone();
    let last = path.last().unwrap().clone();
    let op = r.below(4);
    let p = parent(root, &path);
    match (op, &last, p) {
        (0, Step::Key(k), Value::Table(t)) => {
            t.remove(k);
            format!("deleted {path:?}")
        }
        (0, Step::Index(i), Value::Array(a)) => {
            a.remove(*i);
            format!("deleted {path:?}")
        }
        (1, Step::Key(k), Value::Table(t)) => {
            // the same value under a second name (an unknown key, or a copied stage for a `stages` table)
            let v = t[k].clone();
            t.insert(format!("{k}_copy"), v);
            format!("duplicated {path:?}")
        }
        (1, Step::Index(i), Value::Array(a)) => {
            let v = a[*i].clone();
            a.insert(*i, v);
            format!("duplicated {path:?}")
        }
        (_, Step::Key(k), Value::Table(t)) => {
            let v = odd(r);
            let d = format!("{path:?} = {v:?}");
            t.insert(k.clone(), v);
            d
        }
        (_, Step::Index(i), Value::Array(a)) => {
            let v = odd(r);
            let d = format!("{path:?} = {v:?}");
            a[*i] = v;
            d
        }
        _ => unreachable!("paths name existing entries"),
    }
}

fn recipes(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            recipes(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

#[test]
fn mangled_recipes_give_located_errors_never_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = std::env::temp_dir().join(format!("mitune-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let mut files = vec![];
    recipes(&root.join("recipes"), &mut files);
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    // `MITUNE_FUZZ_ROUNDS=N MITUNE_FUZZ_SEED=S` for a longer hunt by hand; CI runs the default
    let rounds: usize = std::env::var("MITUNE_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let seed: u64 = std::env::var("MITUNE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_F022);
    let mut r = Lcg(seed);
    let (mut ok, mut errors, mut bad) = (0, 0, vec![]);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let table: Table = text.parse().unwrap();
        for round in 0..rounds {
            let mut v = Value::Table(table.clone());
            let mut what = vec![];
            for _ in 0..1 + r.below(2) {
                what.push(mutate(&mut v, &mut r));
            }
            let mut t = v.as_table().unwrap().clone();
            // `extends` names a file relative to the recipe: keep it pointing there from the scratch copy
            if let Some(Value::String(e)) = t.get("extends") {
                let abs = f.parent().unwrap().join(e);
                t.insert("extends".into(), Value::String(abs.display().to_string()));
            }
            let mut body = toml::to_string(&t).unwrap_or_default();
            if round % 6 == 5 {
                // a line pasted twice
                let lines: Vec<&str> = text.lines().filter(|l| l.contains('=')).collect();
                let l = lines[r.below(lines.len())];
                body = format!("{body}\n{l}\n{l}\n");
                what.push(format!("pasted twice: {l}"));
            }
            let name = format!("{}-{round}.toml", f.file_stem().unwrap().to_string_lossy());
            let p = scratch.join(&name);
            std::fs::write(&p, &body).unwrap();
            let sweep = t.contains_key("sweep");
            let mut c = Command::new(env!("CARGO_BIN_EXE_mitune"));
            c.current_dir(root);
            if sweep {
                c.args(["sweep", p.to_str().unwrap(), "--dry-run"]);
            } else {
                c.args(["validate", p.to_str().unwrap()]);
            }
            let out = c.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => ok += 1,
                // a located error: it names the recipe file, a key of it, or a file it points at
                Some(1)
                    if err.contains("error:")
                        && (err.contains(&name)
                            || err.contains("stages.")
                            || err.contains("model.")
                            || err.contains('`')
                            || err.contains('/')) =>
                {
                    errors += 1
                }
                code => bad.push(format!(
                    "{} with {what:?}: exit {code:?}\n{err}",
                    f.display()
                )),
            }
        }
    }
    eprintln!("{ok} mangled recipes still valid, {errors} located errors");
    assert!(
        bad.is_empty(),
        "{} of {} mangled recipes panicked or gave an unlocated error:\n{}",
        bad.len(),
        ok + errors + bad.len(),
        bad.iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    assert!(errors > 0 && ok > 0, "{ok} ok, {errors} errors");
}
