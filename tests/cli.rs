//! The command line's conventions (issue 11, item 6): `--version` in full, shell
//! completions, man pages, `status` exit 3, usage errors on one line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "earfs {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// `field: value` of the --version output.
fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name}: line in\n{text}"))
        .trim()
}

#[test]
fn version_names_revision_date_aes_kernels_and_fuser() {
    let text = ok(&["--version"]);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(format!("earfs {}", env!("CARGO_PKG_VERSION")).as_str()),
        "{text}"
    );

    // The revision is HEAD's when built from a git work tree (as the tests are).
    let manifest = env!("CARGO_MANIFEST_DIR");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(manifest)
        .output()
        .unwrap();
    assert!(head.status.success(), "git rev-parse: {}", stderr(&head));
    assert_eq!(field(&text, "revision"), stdout(&head).trim(), "{text}");

    // A date, not after today.
    let date = field(&text, "build date");
    let b = date.as_bytes();
    assert!(
        date.len() == 10
            && b[4] == b'-'
            && b[7] == b'-'
            && date.replace('-', "").bytes().all(|c| c.is_ascii_digit()),
        "{date}"
    );
    let today = Command::new("date").args(["-u", "+%F"]).output().unwrap();
    assert!(date <= stdout(&today).trim(), "{date} is in the future");

    // The kernels this CPU has, and the one the sector cipher uses: the same as
    // `earfs speed` measures.
    use earfs::crypto::xts::Kernel;
    let have: Vec<&str> = Kernel::ALL
        .into_iter()
        .filter(|k| k.is_available())
        .map(|k| k.name())
        .collect();
    let lack: Vec<&str> = Kernel::ALL
        .into_iter()
        .filter(|k| !k.is_available())
        .map(|k| k.name())
        .collect();
    let mut want = have.join(", ");
    if !lack.is_empty() {
        want += &format!(" (not on this CPU: {})", lack.join(", "));
    }
    assert_eq!(field(&text, "AES kernels"), want, "{text}");
    assert!(have.contains(&"portable"), "{have:?}");
    let speed: serde_json::Value =
        serde_json::from_str(&ok(&["speed", "--json", "--seconds", "0.01"])).unwrap();
    assert_eq!(
        field(&text, "XTS kernel"),
        speed["aes_kernel"].as_str().unwrap(),
        "{text}"
    );

    // fuser as Cargo.lock pins it.
    let lock = std::fs::read_to_string(Path::new(manifest).join("Cargo.lock")).unwrap();
    let fuser = lock
        .split("\n[[package]]\n")
        .find(|p| p.starts_with("name = \"fuser\"\n"))
        .and_then(|p| p.lines().nth(1))
        .and_then(|l| l.strip_prefix("version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    assert_eq!(field(&text, "fuser"), fuser, "{text}");
    assert!(field(&text, "rustc").starts_with("rustc 1."), "{text}");

    // -V stays one line.
    assert_eq!(
        ok(&["-V"]),
        format!("earfs {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `earfs completions SHELL` in a file (removed with the TestDir).
fn completion(shell: &str) -> (TestDir, std::path::PathBuf) {
    let dir = TestDir::new("earfs-cli-");
    let path = dir.path().join(format!("earfs.{shell}"));
    std::fs::write(&path, ok(&["completions", shell])).unwrap();
    (dir, path)
}

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/deps.sh installs it)"))
}

#[test]
fn bash_completion_parses_and_completes_commands_and_flags() {
    let (_d, f) = completion("bash");
    let out = sh("bash", &["-n", f.to_str().unwrap()]);
    assert!(out.status.success(), "bash -n: {}", stderr(&out));
    // Complete `earfs mou`, `earfs status --j` and `earfs completions ` as bash would.
    let complete = |words: &[&str]| {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let script = format!(
            "source {f}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); \
             COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
             _earfs earfs \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            f = f.display(),
            words = quoted.join(" ")
        );
        let out = sh("bash", &["-c", &script]);
        assert!(out.status.success(), "{script}: {}", stderr(&out));
        stdout(&out)
    };
    let got = complete(&["earfs", "mou"]);
    assert!(got.lines().any(|l| l == "mount"), "{got}");
    let got = complete(&["earfs", "status", "--j"]);
    assert!(got.lines().any(|l| l == "--json"), "{got}");
    let got = complete(&["earfs", "completions", ""]);
    for s in ["bash", "zsh", "fish"] {
        assert!(got.lines().any(|l| l == s), "{got}");
    }
}

#[test]
fn zsh_completion_parses() {
    let (_d, f) = completion("zsh");
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.starts_with("#compdef earfs"), "{text}");
    let out = sh("zsh", &["-n", f.to_str().unwrap()]);
    assert!(out.status.success(), "zsh -n: {}", stderr(&out));
}

#[test]
fn fish_completion_parses_and_completes_commands() {
    let (_d, f) = completion("fish");
    let out = sh("fish", &["--no-execute", f.to_str().unwrap()]);
    assert!(out.status.success(), "fish --no-execute: {}", stderr(&out));
    let script = format!("source {}; complete -C 'earfs mou'", f.display());
    let out = sh("fish", &["--no-config", "-c", &script]);
    assert!(out.status.success(), "fish: {}", stderr(&out));
    let got = stdout(&out);
    assert!(got.lines().any(|l| l.starts_with("mount")), "{got}");
}

#[test]
fn man_pages_cover_every_command_and_render_without_warnings() {
    let dir = TestDir::new("earfs-man-");
    let listed = ok(&["man", dir.path().to_str().unwrap()]);
    let mut cmd = earfs::cli::command();
    cmd.build();
    let mut want: Vec<String> = vec!["earfs.1".into()];
    want.extend(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| format!("earfs-{}.1", s.get_name())),
    );
    let mut got: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(want.len() > 20, "{want:?}");
    assert_eq!(listed.lines().count(), want.len(), "{listed}");
    for page in &got {
        let path = dir.path().join(page);
        // -ww: every warning; -z: no output, only the diagnostics.
        let out = sh(
            "groff",
            &["-man", "-Tutf8", "-ww", "-z", path.to_str().unwrap()],
        );
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff {page}: {}",
            stderr(&out)
        );
        let out = Command::new("man")
            .args(["-l", path.to_str().unwrap()])
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        assert!(out.status.success(), "man -l {page}: {}", stderr(&out));
        // Without a terminal man overstrikes bold and underline ("N\x08N"): drop them.
        let mut text = String::new();
        for c in stdout(&out).chars() {
            if c == '\x08' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        let name = page.trim_end_matches(".1");
        assert!(
            text.contains("NAME") && text.contains(name),
            "{page}:\n{text}"
        );
        assert!(text.contains("SYNOPSIS"), "{page}:\n{text}");
    }
    // The mount page carries its options, the top page its commands.
    let mount = std::fs::read_to_string(dir.path().join("earfs-mount.1")).unwrap();
    assert!(
        mount.contains("foreground") && mount.contains("config"),
        "{mount}"
    );
    let top = std::fs::read_to_string(dir.path().join("earfs.1")).unwrap();
    assert!(
        top.contains("earfs\\-mount(1)") || top.contains("mount"),
        "{top}"
    );
}

#[test]
fn status_exits_3_when_no_daemon_runs_for_the_mountpoint() {
    let vol = Volume::new();
    let mnt = vol.mnt.to_str().unwrap().to_string();
    // Nothing mounted yet: 3, as `systemctl status` of a stopped unit.
    let out = run(&["status", &mnt]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("earfs: no earfs daemon ") && stderr(&out).lines().count() == 1,
        "{}",
        stderr(&out)
    );
    // A path that does not exist: no daemon for it either.
    let absent = vol.dir.path().join("absent");
    let out = run(&["status", "--json", absent.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // Mounted: 0, and the reply names the mountpoint.
    {
        let _m = vol.mount(&[]);
        let text = ok(&["status", &mnt]);
        assert!(text.contains(&mnt), "{text}");
    }
    // Unmounted again: 3.
    let out = run(&["status", &mnt]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // Without a mountpoint it lists the running daemons, none included: 0.
    let out = run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A usage error: exit 2, one `earfs:` line first, then the usage, no clap `error:`.
fn usage_error(args: &[&str]) -> Vec<String> {
    let out = run(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    let err = stderr(&out);
    let lines: Vec<String> = err.lines().map(str::to_string).collect();
    assert!(lines[0].starts_with("earfs: "), "{err}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("earfs:")).count(),
        1,
        "{err}"
    );
    assert!(lines[1].starts_with("Usage: earfs"), "{err}");
    assert!(!err.contains("error:"), "{err}");
    lines
}

#[test]
fn a_usage_error_is_one_earfs_line_then_the_usage() {
    let l = usage_error(&["mount", "--no-such-flag", "/a", "/b"]);
    assert!(
        l[0].starts_with("earfs: unexpected argument '--no-such-flag' found"),
        "{l:?}"
    );
    assert!(l[1].starts_with("Usage: earfs mount "), "{l:?}");

    // clap's context (the possible values) joins the one line; the usage of the
    // subcommand follows even when clap's own text has none.
    let l = usage_error(&["init", "--kms", "vault", "/x"]);
    assert_eq!(
        l[0],
        "earfs: invalid value 'vault' for '--kms <KMS>' (possible values: local, aws, gcp)"
    );
    assert!(l[1].starts_with("Usage: earfs init "), "{l:?}");

    let l = usage_error(&["completions"]);
    assert_eq!(
        l[0],
        "earfs: the following required arguments were not provided: <SHELL>"
    );
    let l = usage_error(&["frobnicate"]);
    assert!(
        l[0].starts_with("earfs: unrecognized subcommand 'frobnicate'"),
        "{l:?}"
    );
    // Bare `earfs`: one line, then the usage and the list of commands.
    let l = usage_error(&[]);
    assert_eq!(l[0], "earfs: no command given");
    assert!(
        l.iter().any(|x| x.trim_start().starts_with("mount ")),
        "{l:?}"
    );

    // --help and --version are not errors.
    let out = run(&["mount", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Usage: earfs mount"));
}
