//! A run survives what kills runs: SIGKILL at random moments of a two-stage pipeline (also inside checkpoint
//! writes and with a torn metrics line) resumes to the losses of an uninterrupted run, and a write that fails
//! (the file-size limit standing in for a full disk; a read-only run directory) stops with a clear error and the
//! last good checkpoint intact.
mod common;

use common::{losses, run_mitune, scratch, world};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// align (4 steps) → instruct (6 steps) on bench-tiny presets, a checkpoint every step.
fn recipe(w: &Path, out: &Path) -> String {
    common::tiny_pipeline("crash", w, out, &["align", "instruct"], "")
}

type Losses = Vec<((String, u64), String)>;

/// The uninterrupted run's losses.
fn reference(d: &Path, w: &Path) -> Losses {
    let a = d.join("a.toml");
    std::fs::write(&a, recipe(w, &d.join("runs-a"))).unwrap();
    let (ok, err) = run_mitune(&["train", a.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let l = losses(&d.join("runs-a/crash"));
    assert_eq!(l.len(), 10, "4 align + 6 instruct steps: {l:?}");
    l
}

/// In a fresh scratch folder `tag`: the reference run, then the same recipe (`b.toml`, run under `runs-b`) killed
/// after instruct step 3, its checkpoints at steps 1 and 2. Returns (folder, reference losses, b.toml, the run).
fn killed_after_instruct_3(tag: &str) -> (PathBuf, Losses, PathBuf, PathBuf) {
    let d = scratch(tag);
    let w = world(&d);
    let want = reference(&d, &w);
    let b = d.join("b.toml");
    std::fs::write(&b, recipe(&w, &d.join("runs-b"))).unwrap();
    let run = d.join("runs-b/crash");
    let (ok, _) = run_mitune(
        &["train", b.to_str().unwrap()],
        Some(("MITUNE_FAULT_ABORT_AT_STEP", "instruct:3")),
    );
    assert!(!ok, "the fault should have killed the run");
    assert_eq!(
        checkpoints(&run.join("instruct")),
        ["step-000001", "step-000002"]
    );
    (d, want, b, run)
}

/// Distinct (stage, step) losses logged so far (a torn last line is not counted).
fn logged(run: &Path) -> usize {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    for l in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(l)
            && v.get("loss").is_some()
        {
            seen.insert((v["stage"].to_string(), v["step"].as_u64()));
        }
    }
    seen.len()
}

/// Complete checkpoints of a stage (as `--resume` sees them).
fn checkpoints(stage: &Path) -> Vec<String> {
    mitune::stages::checkpoints::list(stage)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into())
        .collect()
}

#[test]
fn sigkill_at_random_moments_resumes_to_the_same_losses() {
    let d = scratch("crash-kill");
    let w = world(&d);
    let want = reference(&d, &w);
    let b = d.join("b.toml");
    std::fs::write(&b, recipe(&w, &d.join("runs-b"))).unwrap();
    let run = d.join("runs-b/crash");
    let train = |resume: bool, fault: Option<&str>| {
        let mut args = vec!["train", b.to_str().unwrap()];
        if resume {
            args.push("--resume");
        }
        run_mitune(&args, fault.map(|f| ("MITUNE_FAULT_ABORT_AT_STEP", f)))
    };

    // Killed inside checkpoint writes (model written, optimizer state and state.json not yet): the half-written
    // folder is never taken for a checkpoint.
    let (ok, _) = train(false, Some("align:2:checkpoint"));
    assert!(!ok, "the fault should have killed the run");
    assert!(run.join("align/checkpoints/step-000002.tmp").exists());
    assert_eq!(checkpoints(&run.join("align")), ["step-000001"]);
    let (ok, _) = train(true, Some("instruct:3:checkpoint"));
    assert!(!ok, "the fault should have killed the run");
    assert_eq!(
        checkpoints(&run.join("instruct")),
        ["step-000001", "step-000002"]
    );
    // A line torn by the kill (the process died mid-write) is cut, not glued to the next one.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(run.join("metrics.jsonl"))
            .unwrap();
        write!(f, "{{\"stage\":\"instruct\",\"step\":3,\"lo").unwrap();
    }

    let (ok, err) = train(true, None);
    assert!(ok, "{err}");
    assert_eq!(
        losses(&run),
        want,
        "losses after the checkpoint-write kills differ"
    );

    // Fresh runs (`runs-c0`, `runs-c1`, …) killed by SIGKILL at pseudo-random moments (a fixed LCG, so a sequence
    // can be replayed), resuming each time: the first in start-up, then each once the run has logged one further
    // step, plus a random few milliseconds — so kills land in steps, checkpoint writes and final saves however fast
    // this machine is. A tiny step takes ~10 ms, so one run may finish before three kills land (seen on CI): then
    // another fresh run is killed the same way, each checked against the uninterrupted losses, until three have.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rand = |n: u64| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) % n
    };
    let mut killed = 0;
    for pass in 0..4 {
        if killed >= 3 {
            break;
        }
        let c = d.join(format!("c{pass}.toml"));
        std::fs::write(&c, recipe(&w, &d.join(format!("runs-c{pass}")))).unwrap();
        let run = d.join(format!("runs-c{pass}/crash"));
        let mut finished = false;
        for round in 0..12 {
            let target = if round == 0 {
                0
            } else {
                (logged(&run) + 1).min(10)
            };
            let log = d.join(format!("pass-{pass}-round-{round}.log"));
            let mut child = Command::new(env!("CARGO_BIN_EXE_mitune"))
                .args(["train", c.to_str().unwrap(), "--resume"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let t0 = Instant::now();
            let start_up = Duration::from_millis(20 + rand(100));
            let mut due: Option<Instant> = None;
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    assert!(
                        st.success(),
                        "pass {pass} round {round}: the run failed on its own: {}",
                        std::fs::read_to_string(&log).unwrap()
                    );
                    finished = true;
                    break;
                }
                if due.is_none()
                    && (target == 0 && t0.elapsed() >= start_up
                        || target > 0 && logged(&run) >= target)
                {
                    due = Some(Instant::now() + Duration::from_micros(rand(8000)));
                }
                if due.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(300),
                    "pass {pass} round {round} hangs"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            if finished {
                break;
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            killed += 1;
            eprintln!(
                "pass {pass} round {round}: killed after {:?} (target {target} steps logged); checkpoints align {:?}, instruct {:?}",
                t0.elapsed(),
                checkpoints(&run.join("align")),
                checkpoints(&run.join("instruct"))
            );
        }
        if !finished {
            let (ok, err) = run_mitune(&["train", c.to_str().unwrap(), "--resume"], None);
            assert!(ok, "{err}");
        }
        assert!(run.join("instruct/done.json").exists());
        assert_eq!(
            losses(&run),
            want,
            "pass {pass}: losses after its kills differ from the uninterrupted run"
        );
        assert!(
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
            "every metrics line parses"
        );
    }
    assert!(killed >= 3, "only {killed} kills landed in four runs");
}

/// A checkpoint write that fails (here the process's file-size limit, `ulimit -f`, which fails writes with
/// EFBIG the way a full disk fails them with ENOSPC, and works without root or a special filesystem) stops the
/// stage with the reason and the last good checkpoint, removes its partial folder, and `--resume` continues.
#[test]
fn a_failed_checkpoint_write_keeps_the_last_good_one() {
    let (_, want, b, run) = killed_after_instruct_3("crash-full");
    let before = checkpoints(&run.join("instruct"));
    let weights = run.join("instruct/checkpoints/step-000002/model.safetensors");
    let size_kb = std::fs::metadata(&weights).unwrap().len() / 1024;
    assert!(
        size_kb > 64,
        "the model file is too small for this test: {size_kb} KiB"
    );
    // bash's `ulimit -f` counts KiB; SIGXFSZ ignored so the write fails instead of killing the process
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {}; exec \"$0\" train \"$1\" --resume",
            size_kb / 2
        ))
        .arg(env!("CARGO_BIN_EXE_mitune"))
        .arg(&b)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the write should have failed: {err}");
    assert!(
        err.contains("the checkpoint of step 3 was not written")
            && err.contains("size limit")
            && err.contains("step-000002"),
        "{err}"
    );
    assert_eq!(checkpoints(&run.join("instruct")), before);
    assert!(!run.join("instruct/checkpoints/step-000003.tmp").exists());
    let (ok, err) = run_mitune(&["train", b.to_str().unwrap(), "--resume"], None);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 2/6"), "{err}");
    assert_eq!(losses(&run), want);
}

/// `path` and everything under it read-only (`ro`: folders 0555, files 0444) or readable and writable by its owner
/// and readable by all (folders 0755, files 0644).
fn set_read_only(path: &Path, ro: bool) {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.is_dir();
    if dir {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            if !e.path().is_symlink() {
                set_read_only(&e.path(), ro);
            }
        }
    }
    let mode = match (dir, ro) {
        (true, true) => 0o555,
        (true, false) => 0o755,
        (false, true) => 0o444,
        (false, false) => 0o644,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A run directory that cannot be written (its files and folders read-only; as root, which ignores modes, the run
/// resumes as the unprivileged `nobody` through `setpriv`) stops at once with the file, the reason and what to do,
/// and leaves the checkpoints as they were; writable again, `--resume` continues exactly.
#[test]
fn an_unwritable_run_directory_stops_with_the_reason() {
    let (d, want, b, run) = killed_after_instruct_3("crash-ro");
    let before = checkpoints(&run.join("instruct"));
    // everything readable by anyone whatever the umask, the run directory read-only
    set_read_only(&d, false);
    set_read_only(&run, true);
    let mut c = if unsafe { libc::geteuid() } == 0 {
        // a copy beside the data: the build folder may sit under a home `nobody` cannot enter
        use std::os::unix::fs::PermissionsExt;
        let bin = d.join("mitune");
        std::fs::copy(env!("CARGO_BIN_EXE_mitune"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_mitune"))
    };
    let out = c
        .args(["train", b.to_str().unwrap(), "--resume"])
        .output()
        .expect("setpriv (util-linux) runs the check as an unprivileged user");
    set_read_only(&run, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run should not write: {err}");
    assert!(
        err.contains("Permission denied")
            && err.contains("check the owner and mode")
            && err.contains(&run.display().to_string()),
        "{err}"
    );
    assert_eq!(checkpoints(&run.join("instruct")), before);
    let (ok, err) = run_mitune(&["train", b.to_str().unwrap(), "--resume"], None);
    assert!(ok, "{err}");
    assert_eq!(losses(&run), want);
}
