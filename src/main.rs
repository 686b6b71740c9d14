fn main() -> std::process::ExitCode {
    pulso::cli::main()
}
