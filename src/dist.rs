//! Data parallelism across processes (and machines) over MPI, Horovod's design: one process per device, every
//! rank builds the same model from the same seed, takes a disjoint shard of each global batch, and the gradients
//! are summed with one all-reduce per step, so every rank applies the same update. Rank 0 alone writes the run's
//! files.
//!
//! Without the `mpi` feature, or when not started by `mpirun`, this is a world of one process: every call below
//! is then free (no copies, no collectives) and `writer()` is true.
//!
//! A rank that dies takes the job down: `mpirun` notices a rank that ends without `MPI_Finalize` and stops the
//! others, naming it; a rank that returns an error aborts the job with the error and its rank (`fail`); and a
//! collective that waits longer than `MITUNE_COLLECTIVE_TIMEOUT` seconds (default 600) for the other ranks aborts
//! it too, instead of hanging on a rank that is stuck.
use std::sync::OnceLock;

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The job's world (one process unless `init` found `mpirun`).
/// This process's rank among the ranks on its node (Open MPI, MPICH, Slurm), 0 outside a launcher: which GPU a
/// rank takes with `MITUNE_DEVICE=…:local`.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
    .unwrap_or(0)
}

pub fn world() -> World {
    *WORLD.get_or_init(|| World { rank: 0, size: 1 })
}

/// Whether this process writes the run's files (logs, metrics, checkpoints, models): rank 0.
pub fn writer() -> bool {
    world().rank == 0
}

/// Whether several processes share the work.
pub fn parallel() -> bool {
    world().size > 1
}

/// Held by `main` for the life of the process: MPI is finalized when it drops.
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Started by `mpirun`/`mpiexec` (Open MPI, MPICH, or a PMI launcher such as Slurm's)?
fn launched() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some())
}

/// Joins the MPI job when the process was started by an MPI launcher (and built with `mpi`). Also gives each rank
/// its share of the machine's cores when `RAYON_NUM_THREADS` is unset: N ranks on one node would otherwise each
/// start a thread per core and fight over them.
pub fn init() -> Session {
    #[cfg(feature = "mpi")]
    if launched() {
        use mpi::topology::Communicator;
        let universe = mpi::initialize();
        if let Some(u) = &universe {
            let w = u.world();
            let _ = WORLD.set(World {
                rank: w.rank() as usize,
                size: w.size() as usize,
            });
            share_cores();
            watchdog::start();
        }
        return Session {
            _universe: universe,
        };
    }
    #[cfg(not(feature = "mpi"))]
    if launched() {
        eprintln!(
            "warning: started by an MPI launcher, but this mitune was built without the `mpi` feature: every \
             process trains alone. Build with `cargo build --release --features mpi` for data parallelism."
        );
    }
    Session {
        #[cfg(feature = "mpi")]
        _universe: None,
    }
}

#[cfg(feature = "mpi")]
fn share_cores() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let local: usize = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(1);
    // the cores this process may run on: a launcher that binds ranks (Open MPI binds to a core or a socket) has
    // shared them out already; unbound, every rank sees all of them and takes its part
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf only reads a system setting.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let threads = if usable < online {
        usable
    } else {
        (usable / local.max(1)).max(1)
    };
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

/// Ends the whole job because of `msg` on this rank (an error, a stuck collective): every rank stops, none is
/// left waiting in a collective. In a world of one, the caller returns its error as usual instead.
pub fn fail(msg: &str) -> ! {
    eprintln!("rank {} of {}: {msg}", world().rank, world().size);
    #[cfg(feature = "mpi")]
    {
        use mpi::topology::Communicator;
        mpi::topology::SimpleCommunicator::world().abort(1)
    }
    #[cfg(not(feature = "mpi"))]
    std::process::exit(1)
}

/// Waits until every rank got here (rank 0 generated the data, created the run's folders).
pub fn barrier() {
    if !parallel() {
        return;
    }
    #[cfg(feature = "mpi")]
    {
        use mpi::collective::CommunicatorCollectives;
        let _w = watchdog::Guard::new("barrier");
        mpi::topology::SimpleCommunicator::world().barrier();
    }
}

/// Elements per MPI call: MPI counts are C ints, and a bounded bucket keeps the copy's peak small.
#[cfg(feature = "mpi")]
const BUCKET: usize = 1 << 26;

/// Sums `buf` element-wise over the ranks, in place (every rank gets the sum). `what` names it if it times out.
pub fn sum_f32(buf: &mut [f32], what: &str) {
    if !parallel() {
        return;
    }
    #[cfg(feature = "mpi")]
    {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let _w = watchdog::Guard::new(what);
        let world = mpi::topology::SimpleCommunicator::world();
        let mut out = vec![0f32; buf.len().min(BUCKET)];
        for chunk in buf.chunks_mut(BUCKET) {
            let out = &mut out[..chunk.len()];
            world.all_reduce_into(&chunk[..], out, SystemOperation::sum());
            chunk.copy_from_slice(out);
        }
    }
    #[cfg(not(feature = "mpi"))]
    let _ = (buf, what);
}

/// `sum_f32` for a few f64 scalars (losses, token counts).
pub fn sum_f64(buf: &mut [f64], what: &str) {
    if !parallel() {
        return;
    }
    #[cfg(feature = "mpi")]
    {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let _w = watchdog::Guard::new(what);
        let world = mpi::topology::SimpleCommunicator::world();
        let mut out = vec![0f64; buf.len()];
        world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
        buf.copy_from_slice(&out);
    }
    #[cfg(not(feature = "mpi"))]
    let _ = (buf, what);
}

/// Items `0..n` this rank takes: every `size`-th from its rank on (the same split on every rank, disjoint, and
/// together all of them).
pub fn shard(n: usize) -> impl Iterator<Item = usize> {
    let w = world();
    (w.rank..n).step_by(w.size)
}

/// Stops the job when a collective waits too long: a stuck rank otherwise leaves the others waiting forever.
#[cfg(feature = "mpi")]
mod watchdog {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    static SINCE: Mutex<Option<(Instant, String)>> = Mutex::new(None);

    fn limit() -> Duration {
        let s = std::env::var("MITUNE_COLLECTIVE_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(600.0);
        Duration::from_secs_f64(s)
    }

    pub fn start() {
        let limit = limit();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(200).min(limit));
                let late = SINCE
                    .lock()
                    .ok()
                    .and_then(|g| g.as_ref().map(|(t, w)| (t.elapsed(), w.clone())))
                    .filter(|(e, _)| *e > limit);
                if let Some((waited, what)) = late {
                    super::fail(&format!(
                        "{what} waited {:.0} s for the other ranks (MITUNE_COLLECTIVE_TIMEOUT = {:.0} s): one of \
                         them is stuck or gone; stopping the job. `--resume` continues from the last checkpoint.",
                        waited.as_secs_f64(),
                        limit.as_secs_f64()
                    ));
                }
            }
        });
    }

    /// Marks a collective in flight while alive.
    pub struct Guard;

    impl Guard {
        pub fn new(what: &str) -> Guard {
            if let Ok(mut g) = SINCE.lock() {
                *g = Some((Instant::now(), what.to_string()));
            }
            Guard
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            if let Ok(mut g) = SINCE.lock() {
                *g = None;
            }
        }
    }
}

/// `eprintln!` on rank 0 only: the ranks of a data-parallel job would each print the same line.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {
        if $crate::dist::writer() {
            eprintln!($($t)*);
        }
    };
}
