//! Recipe resolution: a recipe file plus its `extends` chain plus `--set a.b.c=VALUE` overrides become one merged
//! `toml::Table`, and every key can be traced back to the file and line (or the `--set`) that gave its value.
//! Rules: single-parent `extends` (relative to the naming file, cycles rejected); the child deep-merges onto the
//! parent, except that a table whose `kind` differs is replaced whole; arrays and scalars are replaced. Following
//! MaxText's pyconfig, an override must name a key that already exists (typos fail loudly instead of being ignored);
//! the one exception is `kind`, which swaps a table's variant and opens that table to new keys.
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::{Table, Value};

/// Where a key or an error comes from: a recipe file with 1-based line/column, or a `--set` (file = "--set a.b.c").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub col: Option<usize>,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.col) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}", self.file.display()),
            (Some(l), None) => write!(f, "{}:{l}", self.file.display()),
            _ => write!(f, "{}", self.file.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "cannot read recipe {file}: {source} (check the path; `extends` is relative to the file that names it)"
    )]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{at}: invalid TOML: {message} (fix the recipe at that position)")]
    Syntax { at: Located, message: String },
    #[error(
        "{file}: `extends` must be a string path to a parent recipe, found a {found} (write extends = \"base.toml\")"
    )]
    BadExtends { file: PathBuf, found: &'static str },
    #[error("recipe `extends` cycle: {chain} (remove the `extends` that points back)")]
    Cycle { chain: String },
    #[error("--set {set}: {reason}")]
    BadSet { set: String, reason: String },
    #[error(
        "--set {set}: no key `{key}` in {table} (keys: {keys}); check the spelling, or add `{key}` to {recipe}"
    )]
    UnknownKey {
        set: String,
        key: String,
        table: String,
        keys: String,
        recipe: PathBuf,
    },
}

/// Dotted key path -> (line, col) of the key's first mention in one file.
type KeyPos = HashMap<Vec<String>, (usize, usize)>;
#[derive(Debug, Clone)]
struct Source {
    file: PathBuf,
    keys: KeyPos,
}

/// The merged recipe, with enough bookkeeping to point error messages at the right file and line.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub table: Table,
    /// The recipe and its ancestors, child first.
    pub files: Vec<PathBuf>,
    sources: Vec<Source>,
    set_keys: Vec<Vec<String>>,
    /// The `[sweep]` table of the top file (a sweep file is a recipe plus its grid; see `sweep.rs`).
    pub sweep: Option<Table>,
}

/// Load `path`, follow its `extends` chain, merge, then apply `sets` (each "a.b.c=VALUE") in order.
pub fn resolve(path: &Path, sets: &[String]) -> Result<Resolved, ResolveError> {
    let (mut files, mut canon): (Vec<PathBuf>, Vec<PathBuf>) = (Vec::new(), Vec::new());
    let (mut tables, mut sources): (Vec<Table>, Vec<Source>) = (Vec::new(), Vec::new());
    let mut sweep = None;
    let mut next = Some(path.to_path_buf());
    while let Some(file) = next.take() {
        let read_err = |source| ResolveError::Read {
            file: file.clone(),
            source,
        };
        let c = std::fs::canonicalize(&file).map_err(read_err)?;
        if let Some(i) = canon.iter().position(|p| *p == c) {
            let chain: Vec<String> = files[i..]
                .iter()
                .chain([&file])
                .map(|p| p.display().to_string())
                .collect();
            return Err(ResolveError::Cycle {
                chain: chain.join(" -> "),
            });
        }
        let text = std::fs::read_to_string(&file).map_err(read_err)?;
        let (mut table, keys) = parse_file(&file, &text)?;
        if files.is_empty()
            && let Some(Value::Table(t)) = table.remove("sweep")
        {
            sweep = Some(t);
        }
        match table.remove("extends") {
            None => {}
            Some(Value::String(p)) => {
                let p = PathBuf::from(p);
                next = Some(if p.is_absolute() {
                    p
                } else {
                    file.parent().unwrap_or(Path::new("")).join(p)
                });
            }
            Some(other) => {
                return Err(ResolveError::BadExtends {
                    file,
                    found: other.type_str(),
                });
            }
        }
        canon.push(c);
        sources.push(Source {
            file: file.clone(),
            keys,
        });
        files.push(file);
        tables.push(table);
    }
    let mut table = Table::new();
    tables
        .into_iter()
        .rev()
        .for_each(|layer| merge(&mut table, layer));
    let (mut changed_kinds, mut set_keys) = (Vec::new(), Vec::new());
    for set in sets {
        let (key_path, value) = parse_set(set)?;
        apply_set(
            &mut table,
            &key_path,
            value,
            set,
            &mut changed_kinds,
            &files[0],
        )?;
        set_keys.push(key_path);
    }
    Ok(Resolved {
        table,
        files,
        sources,
        set_keys,
        sweep,
    })
}

/// Parse one file into values plus key positions; syntax errors carry file:line:col.
fn parse_file(file: &Path, text: &str) -> Result<(Table, KeyPos), ResolveError> {
    let syntax = |e: toml::de::Error| {
        let lc = e.span().map(|span| line_col(text, span.start));
        let at = Located {
            file: file.to_path_buf(),
            line: lc.map(|x| x.0),
            col: lc.map(|x| x.1),
        };
        ResolveError::Syntax {
            at,
            message: e.message().to_string(),
        }
    };
    let doc = DeTable::parse(text).map_err(syntax)?;
    let mut keys = HashMap::new();
    collect_keys(doc.get_ref(), &mut Vec::new(), text, &mut keys);
    let table = text.parse::<Table>().map_err(syntax)?;
    Ok((table, keys))
}

fn collect_keys(t: &DeTable<'_>, prefix: &mut Vec<String>, text: &str, out: &mut KeyPos) {
    for (k, v) in t.iter() {
        prefix.push(k.get_ref().to_string());
        out.entry(prefix.clone())
            .or_insert_with(|| line_col(text, k.span().start));
        if let DeValue::Table(sub) = v.get_ref() {
            collect_keys(sub, prefix, text, out);
        }
        prefix.pop();
    }
}

/// 1-based line and column (in characters) of byte offset `off`.
fn line_col(text: &str, off: usize) -> (usize, usize) {
    let off = (0..=off.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// Deep-merge `child` onto `parent`: tables merge key by key, except that a table whose `kind` differs (both sides
/// set it, to different values) is replaced by the child's; arrays and scalars are replaced.
pub fn merge(parent: &mut Table, child: Table) {
    for (key, value) in child {
        if let Value::Table(c) = value {
            if let Some(Value::Table(p)) = parent.get_mut(&key) {
                let differs =
                    matches!((p.get("kind"), c.get("kind")), (Some(a), Some(b)) if a != b);
                if !differs {
                    merge(p, c);
                    continue;
                }
            }
            parent.insert(key, Value::Table(c));
        } else {
            parent.insert(key, value);
        }
    }
}

/// Split "a.b.c=VALUE": VALUE is read as a TOML value (`1e-5`, `true`, `[1,2]`, `"x"`, `{a=1}`), else as a bare string.
pub fn parse_set(s: &str) -> Result<(Vec<String>, Value), ResolveError> {
    let bad = |reason: &str| ResolveError::BadSet {
        set: s.to_string(),
        reason: reason.to_string(),
    };
    let Some((key, raw)) = s.split_once('=') else {
        return Err(bad("missing `=` (write --set section.key=VALUE)"));
    };
    let path: Vec<String> = key
        .trim()
        .split('.')
        .map(|p| p.trim().to_string())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(bad("empty key segment (write --set section.key=VALUE)"));
    }
    let raw = raw.trim();
    Ok((
        path,
        raw.parse::<Value>()
            .unwrap_or_else(|_| Value::String(raw.to_string())),
    ))
}

/// True if table `table_path` is, or lies inside, a table whose `kind` an earlier --set changed.
fn inside_changed(changed: &[Vec<String>], table_path: &[String]) -> bool {
    changed.iter().any(|c| table_path.starts_with(c.as_slice()))
}

fn unknown(set: &str, table_path: &[String], key: &str, t: &Table, recipe: &Path) -> ResolveError {
    let mut keys: Vec<&str> = t.keys().map(String::as_str).collect();
    keys.sort_unstable();
    ResolveError::UnknownKey {
        set: set.to_string(),
        key: key.to_string(),
        table: if table_path.is_empty() {
            "the top level".to_string()
        } else {
            table_path.join(".")
        },
        keys: if keys.is_empty() {
            "none".to_string()
        } else {
            keys.join(", ")
        },
        recipe: recipe.to_path_buf(),
    }
}

/// Apply one override. Setting `kind` to a new value resets that table to `{ kind }` (as a kind change does when
/// merging), and later --sets may then add keys anywhere inside it.
fn apply_set(
    root: &mut Table,
    path: &[String],
    value: Value,
    set: &str,
    changed: &mut Vec<Vec<String>>,
    recipe: &Path,
) -> Result<(), ResolveError> {
    let (last, parents) = path
        .split_last()
        .expect("parse_set returns a non-empty path");
    let mut t = root;
    for (i, seg) in parents.iter().enumerate() {
        if !t.contains_key(seg) {
            if !inside_changed(changed, &path[..i]) {
                return Err(unknown(set, &path[..i], seg, t, recipe));
            }
            t.insert(seg.clone(), Value::Table(Table::new()));
        }
        t = match t.get_mut(seg) {
            Some(Value::Table(sub)) => sub,
            Some(other) => {
                let (p, ty) = (path[..=i].join("."), other.type_str());
                let reason =
                    format!("`{p}` is a {ty}, not a table (set `{p}` itself, or fix the path)");
                return Err(ResolveError::BadSet {
                    set: set.to_string(),
                    reason,
                });
            }
            None => unreachable!("inserted above"),
        };
    }
    if last == "kind" {
        let differs = t.get("kind").is_some_and(|k| *k != value);
        if differs || !t.contains_key("kind") {
            changed.push(parents.to_vec());
        }
        if differs {
            t.clear();
        }
    } else if !t.contains_key(last) && !inside_changed(changed, parents) {
        return Err(unknown(set, parents, last, t, recipe));
    }
    t.insert(last.clone(), value);
    Ok(())
}

impl Resolved {
    /// Where the value at `key_path` came from: the latest `--set` covering it, else the first file (child first)
    /// that defines it; if it does not exist, the deepest existing ancestor; failing all, the recipe file itself.
    pub fn locate(&self, key_path: &[String]) -> Option<Located> {
        let (mut depth, mut t) = (0, Some(&self.table));
        while let Some(v) = key_path.get(depth).and_then(|seg| t?.get(seg)) {
            depth += 1;
            t = v.as_table();
        }
        for d in (1..=depth).rev() {
            let p = &key_path[..d];
            if let Some(s) = self
                .set_keys
                .iter()
                .rev()
                .find(|s| p.starts_with(s.as_slice()))
            {
                return Some(Located {
                    file: PathBuf::from(format!("--set {}", s.join("."))),
                    line: None,
                    col: None,
                });
            }
            for src in &self.sources {
                if let Some(&(line, col)) = src.keys.get(p) {
                    return Some(Located {
                        file: src.file.clone(),
                        line: Some(line),
                        col: Some(col),
                    });
                }
            }
        }
        self.files.first().map(|f| Located {
            file: f.clone(),
            line: None,
            col: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Write `files` (name, text) into a fresh temp dir; returns their paths in order.
    fn files(test: &str, files: &[(&str, &str)]) -> Vec<PathBuf> {
        let d = std::env::temp_dir().join(format!("mitune-resolve-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let write = |(name, text): &(&str, &str)| {
            let p = d.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            p
        };
        files.iter().map(write).collect()
    }
    fn strs(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merge_is_deep_and_kind_change_replaces() {
        let mut p: Table = "s = 1\n[a]\nx = 1\n[a.y]\nz = 2\n[c]\nkind = \"mlp\"\nhidden = 4\n"
            .parse()
            .unwrap();
        merge(
            &mut p,
            "s = 2\n[a.y]\nw = 3\n[c]\nkind = \"linear\"\n"
                .parse()
                .unwrap(),
        );
        let want: Table = "s = 2\n[a]\nx = 1\n[a.y]\nz = 2\nw = 3\n[c]\nkind = \"linear\"\n"
            .parse()
            .unwrap();
        assert_eq!(p, want);
        let mut p: Table = "[c]\nkind = \"mlp\"\nhidden = 4\n".parse().unwrap();
        merge(&mut p, "[c]\nkind = \"mlp\"\ndepth = 2\n".parse().unwrap());
        assert_eq!(
            p,
            "[c]\nkind = \"mlp\"\nhidden = 4\ndepth = 2\n"
                .parse::<Table>()
                .unwrap()
        );
    }

    #[test]
    fn cycle_detected() {
        let p = files(
            "cycle",
            &[
                ("a.toml", "extends = \"b.toml\"\nx = 1\n"),
                ("b.toml", "extends = \"a.toml\"\n"),
            ],
        );
        let e = resolve(&p[0], &[]).unwrap_err();
        assert!(
            matches!(e, ResolveError::Cycle { .. }) && e.to_string().contains("b.toml -> "),
            "{e}"
        );
    }

    #[test]
    fn extends_is_relative_to_the_naming_file() {
        let p = files(
            "relative",
            &[
                (
                    "exp/a.toml",
                    "extends = \"../base/common.toml\"\n[optim]\nlr = 2.0\n",
                ),
                ("base/common.toml", "[optim]\nlr = 1.0\nwd = 0.1\n"),
            ],
        );
        let r = resolve(&p[0], &[]).unwrap();
        assert_eq!(r.files.len(), 2);
        assert!(!r.table.contains_key("extends"));
        assert_eq!(r.table["optim"]["lr"], Value::Float(2.0));
        assert_eq!(r.table["optim"]["wd"], Value::Float(0.1));
    }

    #[test]
    fn set_replaces_with_parsed_types() {
        let p = files(
            "settypes",
            &[(
                "a.toml",
                "name = \"x\"\nsteps = 10\nflag = false\ndims = [1]\n[optim]\nlr = 1e-4\n",
            )],
        );
        let s = strs(&[
            "optim.lr=1e-5",
            "steps=20",
            "flag=true",
            "name=run2",
            "dims=[1, 2]",
        ]);
        let r = resolve(&p[0], &s).unwrap();
        assert_eq!(r.table["optim"]["lr"], Value::Float(1e-5));
        assert_eq!(r.table["steps"], Value::Integer(20));
        assert_eq!(r.table["flag"], Value::Boolean(true));
        assert_eq!(r.table["name"], Value::String("run2".into()));
        assert_eq!(
            r.table["dims"],
            Value::Array(vec![Value::Integer(1), Value::Integer(2)])
        );
        assert!(parse_set("novalue").is_err());
    }

    #[test]
    fn set_missing_key_names_available_keys() {
        let p = files(
            "setmissing",
            &[(
                "a.toml",
                "[stages.instruct.optim]\nkind = \"adamw\"\nlr = 1e-4\nweight_decay = 0.0\n",
            )],
        );
        let e = resolve(&p[0], &strs(&["stages.instruct.optim.lrr=1e-5"]))
            .unwrap_err()
            .to_string();
        let want = "--set stages.instruct.optim.lrr=1e-5: no key `lrr` in stages.instruct.optim (keys: kind, lr, weight_decay)";
        assert!(e.starts_with(want), "{e}");
        let e = resolve(&p[0], &strs(&["stages.instrct.optim.lr=1"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no key `instrct` in stages (keys: instruct)"),
            "{e}"
        );
    }

    #[test]
    fn set_kind_change_opens_table_to_new_keys() {
        let p = files(
            "setkind",
            &[("a.toml", "[model.connector]\nkind = \"mlp\"\nhidden = 4\n")],
        );
        assert!(resolve(&p[0], &strs(&["model.connector.bias=true"])).is_err());
        let r = resolve(
            &p[0],
            &strs(&["model.connector.kind=linear", "model.connector.bias=true"]),
        )
        .unwrap();
        let want: Table = "kind = \"linear\"\nbias = true\n".parse().unwrap();
        assert_eq!(r.table["model"]["connector"], Value::Table(want));
    }

    #[test]
    fn locate_finds_file_and_line() {
        let p = files(
            "locate",
            &[
                ("a.toml", "extends = \"base.toml\"\n\n[optim]\nlr = 2.0\n"),
                ("base.toml", "[optim]\nlr = 1.0\nwd = 0.0\n"),
            ],
        );
        let (a, base) = (p[0].as_path(), p[1].as_path());
        let r = resolve(a, &strs(&["optim.wd=0.5"])).unwrap();
        let at = r.locate(&strs(&["optim", "lr"])).unwrap();
        assert_eq!((at.file.as_path(), at.line, at.col), (a, Some(4), Some(1)));
        let at = r.locate(&strs(&["optim", "nope"])).unwrap();
        assert_eq!((at.file.as_path(), at.line), (a, Some(3)));
        assert_eq!(
            r.locate(&strs(&["optim", "wd"])).unwrap().to_string(),
            "--set optim.wd"
        );
        let at = resolve(a, &[])
            .unwrap()
            .locate(&strs(&["optim", "wd"]))
            .unwrap();
        assert_eq!(at.to_string(), format!("{}:3:1", base.display()));
    }

    #[test]
    fn syntax_error_reports_line() {
        let p = files("syntax", &[("a.toml", "a = 1\nb = tru\n")]);
        let ResolveError::Syntax { at, .. } = resolve(&p[0], &[]).unwrap_err() else {
            panic!("not a syntax error")
        };
        assert_eq!((at.file.as_path(), at.line), (p[0].as_path(), Some(2)));
    }
}
