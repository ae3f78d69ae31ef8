fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, which turns a closed pipe (`mitune validate R | head`) into a panic in println!;
    // the default action ends the process quietly, as for any command-line tool.
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    mitune::cli::main()
}
