//! Thin entry point: parse the command line, run it, map failures to exit codes.

fn main() -> std::process::ExitCode {
    earfs::daemon::logging::init();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if earfs::cli::helper::is_helper(&argv) {
        // mount.fuse.earfs (mount -t fuse.earfs, fstab) or mount.fuse3's `earfs SOURCE DIR`.
        return match earfs::cli::helper::run(&argv) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("earfs: {}", f.message);
                std::process::ExitCode::from(earfs::cli::helper::mount_code(f.code))
            }
        };
    }
    let cli = earfs::cli::parse();
    let json = cli.json_command();
    match earfs::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(f) => {
            if let Some(command) = json {
                earfs::cli::output::print_error(command, &f);
            }
            eprintln!("earfs: {}", f.message);
            std::process::ExitCode::from(f.code)
        }
    }
}
