fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, which turns a closed pipe (`mitune validate R | head`) into a panic in println!;
    // the default action ends the process quietly, as for any command-line tool.
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    mitune::cli::main()
}

/// Every tensor op allocates a fresh output buffer. With glibc's defaults, buffers above 128 KiB (the threshold
/// grows only up to the largest one freed so far) come from `mmap` and go back to the kernel on free, so the next
/// step faults in and zeroes the same pages again: 1.6M minor faults and ~8% of the CPU time in the kernel for
/// three `small-align` steps. Serving buffers up to 32 MiB (glibc's maximum threshold) from the heap and keeping
/// freed heap memory for reuse brings that to 0.43M faults at the same peak RSS. A user's own `MALLOC_*` /
/// `GLIBC_TUNABLES` settings win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
        });
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; called before any thread exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        }
    }
}
