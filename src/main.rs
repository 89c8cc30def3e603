//! The `vaultfs` binary: parse the command line, hand over to the library.

fn main() -> std::process::ExitCode {
    vaultfs::cli::main()
}
