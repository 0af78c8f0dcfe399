//! Thin entry point: parse the command line, run it, map failures to exit codes.

fn main() -> std::process::ExitCode {
    earfs::daemon::logging::init();
    let cli = earfs::cli::parse();
    match earfs::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("earfs: {}", f.message);
            std::process::ExitCode::from(f.code)
        }
    }
}
