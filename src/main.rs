#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    pulso::cli::main()
}
