fn main() -> std::process::ExitCode {
    mitune::cli::main()
}
