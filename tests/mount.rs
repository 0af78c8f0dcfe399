//! Real-mount tests: every operation a database uses, through the kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};

use common::*;
use rand::{Rng, SeedableRng};

#[test]
fn marker_never_reaches_backing_and_zeros_are_encrypted() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let marker = b"EARFS-PLAINTEXT-MARKER-7f3a";
    let mut data = Vec::new();
    for _ in 0..2000 {
        data.extend_from_slice(marker);
    }
    fs::write(m.path("marker.txt"), &data).unwrap();
    fs::create_dir(m.path("sub")).unwrap();
    fs::write(m.path("sub/small"), marker).unwrap();
    fs::write(m.path("zeros"), vec![0u8; 1 << 20]).unwrap();
    let f = File::open(m.path("marker.txt")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("marker.txt")).unwrap(), data);
    for (p, bytes) in all_backing_bytes(&vol.backing) {
        assert!(!contains(&bytes, marker), "marker found in {}", p.display());
    }
    let z = fs::read(m.backing("zeros")).unwrap();
    assert_eq!(z.len(), 4096 + (1 << 20));
    for (i, s) in z[4096..].chunks(4096).enumerate() {
        assert!(
            s.iter().any(|&b| b != 0),
            "sector {i} of a zero-filled file is stored as zeros"
        );
    }
    assert_eq!(fs::read(m.path("zeros")).unwrap(), vec![0u8; 1 << 20]);
}

#[test]
fn random_io_matches_a_model_and_survives_remount() {
    let vol = Volume::new();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    {
        let m = vol.mount(&[]);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("f"))
            .unwrap();
        for _ in 0..400 {
            match rng.gen_range(0..10) {
                0..=5 => {
                    let off = rng.gen_range(0..3 * 4096 * 4) as u64;
                    let len = rng.gen_range(1..3 * 4096);
                    let buf: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                    f.write_all_at(&buf, off).unwrap();
                    let end = off as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&buf);
                }
                6 | 7 => {
                    let sizes = [
                        0u64, 1, 15, 16, 17, 4095, 4096, 4097, 8191, 8192, 8193, 20000, 49152,
                    ];
                    let s = sizes[rng.gen_range(0..sizes.len())];
                    f.set_len(s).unwrap();
                    model.resize(s as usize, 0);
                }
                _ => {
                    let off = rng.gen_range(0..model.len() as u64 + 5000);
                    let len = rng.gen_range(1..10000);
                    let mut buf = vec![0u8; len];
                    let n = read_at_full(&f, &mut buf, off);
                    let want: &[u8] = if off as usize >= model.len() {
                        &[]
                    } else {
                        &model[off as usize..(off as usize + len).min(model.len())]
                    };
                    assert_eq!(&buf[..n], want, "read at {off} len {len}");
                }
            }
            assert_eq!(f.metadata().unwrap().len(), model.len() as u64);
        }
        drop(f);
        assert_eq!(fs::read(m.path("f")).unwrap(), model);
    }
    let m = vol.mount(&[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), model);
    let backing = fs::metadata(m.backing("f")).unwrap().len();
    if model.is_empty() {
        // Empty without a header, or (truncated to zero) its header alone.
        assert!(backing == 0 || backing == 4096, "backing length {backing}");
    } else {
        assert_eq!(backing, common::backing_len(model.len() as u64));
    }
}

fn read_at_full(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read_at(&mut buf[n..], off + n as u64).unwrap();
        if r == 0 {
            break;
        }
        n += r;
    }
    n
}

#[test]
fn concurrent_writers_sharing_sectors_lose_nothing() {
    // Threads write interleaved, unaligned 1000-byte slots of one file, so that most
    // sectors are read-modify-written by several threads at once.
    let vol = Volume::new();
    let m = vol.mount(&["--threads", "4"]);
    let p = m.path("shared");
    File::create(&p).unwrap();
    let threads = 4usize;
    let slots_per_thread = 300usize;
    let slot = 1000usize;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let p = p.clone();
            sc.spawn(move || {
                let f = OpenOptions::new().write(true).open(&p).unwrap();
                for i in 0..slots_per_thread {
                    let n = i * threads + t;
                    f.write_all_at(&vec![(n % 251) as u8 + 1; slot], (n * slot) as u64)
                        .unwrap();
                }
            });
        }
    });
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), threads * slots_per_thread * slot);
    for (n, chunk) in got.chunks(slot).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == (n % 251) as u8 + 1),
            "slot {n} damaged"
        );
    }
}

#[test]
fn truncate_across_sector_boundaries() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let sizes = [
        0u64, 1, 15, 16, 17, 4095, 4096, 4097, 8191, 8192, 8193, 12289,
    ];
    for &from in &sizes {
        for &to in &sizes {
            let p = m.path("t");
            let content: Vec<u8> = (0..from).map(|i| (i % 251) as u8 + 1).collect();
            fs::write(&p, &content).unwrap();
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(to).unwrap();
            drop(f);
            let got = fs::read(&p).unwrap();
            let mut want = content.clone();
            want.resize(to as usize, 0);
            assert_eq!(got, want, "truncate {from} -> {to}");
        }
    }
}

#[test]
fn mount_options_threads_and_read_only() {
    let vol = Volume::new();
    {
        let m = vol.mount(&["--threads", "1", "-o", "noatime,nosuid"]);
        fs::write(m.path("f"), b"one thread").unwrap();
        let opts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = opts
            .lines()
            .find(|l| l.contains(vol.mnt.to_str().unwrap()))
            .unwrap()
            .to_string();
        assert!(
            line.contains("noatime") && line.contains("nosuid"),
            "{line}"
        );
    }
    let m = vol.mount(&["-o", "ro"]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"one thread");
    assert_eq!(
        fs::write(m.path("g"), b"x").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    drop(m);
    let out = run(&[
        "mount",
        "--threads",
        "0",
        vol.backing.to_str().unwrap(),
        vol.mnt.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn append_trunc_and_excl() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let p = m.path("log");
    for i in 0..50 {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap();
        writeln!(f, "line {i}").unwrap();
    }
    let text = fs::read_to_string(&p).unwrap();
    assert_eq!(text.lines().count(), 50);
    assert!(text.ends_with("line 49\n"));
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    f.write_all(b"new").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"new");
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
}

#[test]
fn metadata_ops_dirs_links_symlinks_rename() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    fs::write(m.path("a/b/c/f"), b"hello").unwrap();
    let names: Vec<String> = fs::read_dir(m.path("a/b/c"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["f"]);
    // chmod, chown, utimens
    fs::set_permissions(m.path("a/b/c/f"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.path("a/b/c/f"), Some(1234), Some(4321)).unwrap();
    let md = fs::metadata(m.path("a/b/c/f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid()), (1234, 4321));
    let bmd = fs::metadata(m.backing("a/b/c/f")).unwrap();
    assert_eq!(
        (bmd.uid(), bmd.gid(), bmd.mode() & 0o7777),
        (1234, 4321, 0o640)
    );
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(m.path("a/b/c/f"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(
        fs::metadata(m.path("a/b/c/f")).unwrap().modified().unwrap(),
        t
    );
    // hard link keeps content, link count and header
    fs::hard_link(m.path("a/b/c/f"), m.path("a/hl")).unwrap();
    assert_eq!(fs::metadata(m.path("a/hl")).unwrap().nlink(), 2);
    OpenOptions::new()
        .write(true)
        .open(m.path("a/hl"))
        .unwrap()
        .write_all_at(b"J", 0)
        .unwrap();
    assert_eq!(fs::read(m.path("a/b/c/f")).unwrap(), b"Jello");
    assert_eq!(
        fs::metadata(m.backing("a/hl")).unwrap().ino(),
        fs::metadata(m.backing("a/b/c/f")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(m.path("a/hl")).unwrap().ino(),
        fs::metadata(m.path("a/b/c/f")).unwrap().ino()
    );
    // symlink / readlink
    std::os::unix::fs::symlink("b/c/f", m.path("a/sl")).unwrap();
    assert_eq!(
        fs::read_link(m.path("a/sl")).unwrap().to_str().unwrap(),
        "b/c/f"
    );
    assert_eq!(fs::read(m.path("a/sl")).unwrap(), b"Jello");
    // rename (plain, over an existing file, NOREPLACE, EXCHANGE)
    fs::write(m.path("x"), b"xx").unwrap();
    fs::write(m.path("y"), b"yyy").unwrap();
    let root = File::open(&vol.mnt).unwrap();
    let e = rustix::fs::renameat_with(&root, "x", &root, "y", rustix::fs::RenameFlags::NOREPLACE)
        .unwrap_err();
    assert_eq!(e, rustix::io::Errno::EXIST);
    rustix::fs::renameat_with(&root, "x", &root, "y", rustix::fs::RenameFlags::EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("x")).unwrap(), b"yyy");
    assert_eq!(fs::read(m.path("y")).unwrap(), b"xx");
    fs::rename(m.path("x"), m.path("y")).unwrap();
    assert_eq!(fs::read(m.path("y")).unwrap(), b"yyy");
    assert!(!m.path("x").exists());
    fs::rename(m.path("a/b"), m.path("moved")).unwrap();
    assert_eq!(fs::read(m.path("moved/c/f")).unwrap(), b"Jello");
    // unlink / rmdir
    fs::remove_file(m.path("moved/c/f")).unwrap();
    assert_eq!(fs::metadata(m.path("a/hl")).unwrap().nlink(), 1);
    fs::remove_dir(m.path("moved/c")).unwrap();
    assert_eq!(
        fs::remove_dir(m.path("a")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    // statfs
    let s = rustix::fs::statvfs(&vol.mnt).unwrap();
    assert!(s.f_blocks > 0 && s.f_bsize > 0);
    // fsyncdir
    File::open(m.path("a")).unwrap().sync_all().unwrap();
}

#[test]
fn modes_are_the_callers_after_its_umask_only() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 0; mkdir {0}/d; touch {0}/f; umask 027; mkdir {0}/d2; touch {0}/f2",
            vol.mnt.display()
        ))
        .status()
        .unwrap();
    assert!(out.success());
    for (n, want) in [("d", 0o777), ("f", 0o666), ("d2", 0o750), ("f2", 0o640)] {
        assert_eq!(
            fs::metadata(m.path(n)).unwrap().mode() & 0o7777,
            want,
            "{n}"
        );
        assert_eq!(
            fs::metadata(m.backing(n)).unwrap().mode() & 0o7777,
            want,
            "backing {n}"
        );
    }
}

#[test]
fn unprivileged_write_truncate_and_fallocate_clear_set_id_bits() {
    let vol = Volume::new();
    let m = vol.mount_for_others();
    // The kernel sends fallocate without a kill flag: the daemon clears them itself.
    for (name, op) in [
        ("w", "printf x >> {}"),
        ("t", "truncate -s 1 {}"),
        ("f", "fallocate -l 8192 {}"),
        ("k", "fallocate -n -l 8192 {}"),
    ] {
        let p = m.path(name);
        fs::write(&p, b"data").unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o6775)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o6775);
        let out = as_nobody(&op.replace("{}", p.to_str().unwrap()));
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            fs::metadata(&p).unwrap().mode() & 0o7777,
            0o775,
            "{name}: set-id bits kept"
        );
        assert_eq!(
            fs::metadata(m.backing(name)).unwrap().mode() & 0o7777,
            0o775,
            "{name} in backing"
        );
    }
    // Root (CAP_FSETID) keeps them on write.
    let p = m.path("r");
    fs::write(&p, b"data").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4755)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"more")
        .unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4755);
}

#[test]
fn config_is_invisible_and_cannot_be_created() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    assert!(!m.path("earfs.conf").exists());
    let names: Vec<_> = fs::read_dir(&vol.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let e = fs::write(m.path("earfs.conf"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert_eq!(
        fs::create_dir(m.path("earfs.conf"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    fs::write(m.path("other"), b"x").unwrap();
    assert_eq!(
        fs::rename(m.path("other"), m.path("earfs.conf"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    // Allowed below the root.
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/earfs.conf"), b"fine").unwrap();
    assert!(
        fs::read_to_string(vol.backing.join("earfs.conf"))
            .unwrap()
            .contains("volume_id")
    );
}

#[test]
fn fallocate_punch_hole_and_seek_data_hole() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.path("f"))
        .unwrap();
    // mode 0 grows the file with zeros
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 40000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 40000);
    let mut buf = vec![1u8; 40000];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // KEEP_SIZE does not change the size
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::KEEP_SIZE, 0, 100000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 40000);
    // data, then punch a hole with unaligned edges
    let data: Vec<u8> = (0..40000u32).map(|i| (i % 200) as u8 + 1).collect();
    f.write_all_at(&data, 0).unwrap();
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        5000,
        20000,
    )
    .unwrap();
    let mut got = vec![0u8; 40000];
    f.read_exact_at(&mut got, 0).unwrap();
    let mut want = data.clone();
    want[5000..25000].fill(0);
    assert_eq!(got, want);
    assert_eq!(f.metadata().unwrap().len(), 40000);
    // SEEK_HOLE/SEEK_DATA: sectors 2..=5 (plaintext 8192..24576) are whole holes
    let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).unwrap();
    assert_eq!(hole, 8192);
    let data_at = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(8192)).unwrap();
    assert_eq!(data_at, 24576);
    assert_eq!(
        rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(30000)).unwrap(),
        40000
    );
    assert_eq!(
        rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(40000)).unwrap_err(),
        rustix::io::Errno::NXIO
    );
    // Unsupported modes are refused, not faked.
    let e =
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::COLLAPSE_RANGE, 0, 4096).unwrap_err();
    assert!(
        e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL,
        "{e:?}"
    );
}

#[test]
fn o_direct_aligned_io_passes_through() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let p = m.path("direct");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    #[repr(C, align(4096))]
    struct Page([u8; 8192]);
    let mut page = Box::new(Page([0u8; 8192]));
    for (i, b) in page.0.iter_mut().enumerate() {
        *b = (i % 97) as u8;
    }
    f.write_all_at(&page.0, 8192).unwrap();
    let mut back = Box::new(Page([0u8; 8192]));
    f.read_exact_at(&mut back.0, 8192).unwrap();
    assert_eq!(&back.0[..], &page.0[..]);
    // Unaligned I/O on an O_DIRECT handle still works (bounce through the normal path).
    f.seek(SeekFrom::Start(3)).unwrap();
    let mut small = [0u8; 5];
    f.read_exact(&mut small).unwrap();
    assert_eq!(small, [0, 0, 0, 0, 0]);
    // The daemon holds an O_DIRECT descriptor of the backing file for this handle.
    let pid = daemon_pid(&vol);
    let backing = m.backing("direct");
    let direct_fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| fs::read_link(e.path()).ok().as_deref() == Some(backing.as_path()))
        .filter(|e| {
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|v| i32::from_str_radix(v.trim(), 8).unwrap())
                .unwrap_or(0);
            flags & libc::O_DIRECT != 0
        })
        .count();
    assert_eq!(direct_fds, 1, "one O_DIRECT backing descriptor");
    drop(f);
    let all = fs::read(&p).unwrap();
    assert_eq!(&all[8192..], &page.0[..]);
    // O_DIRECT on a read-only open is never EINVAL.
    File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
}

#[test]
fn mmap_shared_writable() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let p = m.path("mm");
    fs::write(&p, vec![b'a'; 10000]).unwrap();
    python(
        "import mmap,sys\nf=open(sys.argv[1],'r+b')\nmm=mmap.mmap(f.fileno(),0)\nmm[5000:5005]=b'HELLO'\nmm[0:1]=b'Z'\nmm.flush()\nmm.close()\nf.close()",
        &[p.to_str().unwrap()],
    );
    let got = fs::read(&p).unwrap();
    assert_eq!(&got[5000..5005], b"HELLO");
    assert_eq!(got[0], b'Z');
    assert_eq!(got.len(), 10000);
    drop(m);
    let m = vol.mount(&[]);
    let got = fs::read(m.path("mm")).unwrap();
    assert_eq!(&got[5000..5005], b"HELLO");
}

#[test]
fn user_xattrs_only() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let p = m.path("x");
    fs::write(&p, b"x").unwrap();
    rustix::fs::setxattr(&p, "user.db", b"v1", rustix::fs::XattrFlags::empty()).unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(&p, "user.db", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"v1");
    let mut list = [0u8; 256];
    let n = rustix::fs::listxattr(&p, &mut list[..]).unwrap();
    assert_eq!(&list[..n], b"user.db\0");
    assert_eq!(
        rustix::fs::getxattr(&p, "user.none", &mut buf[..]).unwrap_err(),
        rustix::io::Errno::NODATA
    );
    assert_eq!(
        rustix::fs::setxattr(&p, "trusted.x", b"v", rustix::fs::XattrFlags::empty()).unwrap_err(),
        rustix::io::Errno::OPNOTSUPP
    );
    rustix::fs::removexattr(&p, "user.db").unwrap();
    assert_eq!(rustix::fs::listxattr(&p, &mut list[..]).unwrap(), 0);
}

#[test]
fn posix_and_flock_locks_conflict_between_processes() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let p = m.path("lockfile");
    fs::write(&p, b"lock").unwrap();
    let holder = std::process::Command::new("python3")
        .arg("-c")
        .arg("import fcntl,sys\nf=open(sys.argv[1],'r+')\nfcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\ng=open(sys.argv[1],'r')\nfcntl.flock(g,fcntl.LOCK_EX|fcntl.LOCK_NB)\nprint('locked',flush=True)\nsys.stdin.read()")
        .arg(&p)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut holder = holder;
    let mut line = [0u8; 7];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"locked\n");
    let out = python(
        "import fcntl,sys,errno\nf=open(sys.argv[1],'r+')\ntry:\n  fcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB); print('posix-got')\nexcept OSError as e: print('posix-busy', e.errno in (errno.EAGAIN, errno.EACCES))\ng=open(sys.argv[1],'r')\ntry:\n  fcntl.flock(g,fcntl.LOCK_EX|fcntl.LOCK_NB); print('flock-got')\nexcept OSError as e: print('flock-busy', e.errno==errno.EWOULDBLOCK)",
        &[p.to_str().unwrap()],
    );
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert_eq!(out, "posix-busy True\nflock-busy True\n");
    let out = python(
        "import fcntl,sys\nf=open(sys.argv[1],'r+')\nfcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\nprint('ok')",
        &[p.to_str().unwrap()],
    );
    assert_eq!(out, "ok\n");
}

#[test]
fn fsync_and_fdatasync_reach_the_backing_file() {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        panic!("strace is required (scripts/test.sh installs it)");
    }
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let pid = daemon_pid(&vol);
    let trace = vol.dir.path().join("trace");
    let mut st = std::process::Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=fsync,fdatasync",
            "-o",
            trace.to_str().unwrap(),
            "-p",
            &pid.to_string(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until strace reports it is attached.
    let mut err = st.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !contains(&seen, b"attached") {
        if err.read(&mut b).unwrap() == 0 {
            break;
        }
        seen.push(b[0]);
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.path("wal"))
        .unwrap();
    f.write_all_at(b"commit", 0).unwrap();
    f.sync_data().unwrap();
    f.sync_all().unwrap();
    drop(f);
    // Both calls returned, so the daemon's backing calls have completed under strace,
    // which records them before letting the traced thread go on; stop it now.
    signal(st.id(), rustix::process::Signal::INT);
    st.wait().unwrap();
    let text = fs::read_to_string(&trace).unwrap();
    assert_eq!(text.matches("fdatasync(").count(), 1, "{text}");
    assert_eq!(text.matches("fsync(").count(), 1, "{text}");
}

fn daemon_pid(vol: &Volume) -> u32 {
    let needle = vol.backing.to_str().unwrap().to_string();
    for e in fs::read_dir("/proc").unwrap() {
        let e = e.unwrap();
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("--foreground") && cmd.contains(&needle) {
            return pid;
        }
    }
    panic!("daemon not found");
}

#[test]
fn reader_sees_old_or_new_file_whole_across_rename() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let target = m.path("current");
    fs::write(&target, vec![b'0'; 10000]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = {
        let target = target.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = fs::read(&target).unwrap();
                let c = data[0];
                let want_len = 10000 + (c - b'0') as usize * 777;
                assert_eq!(data.len(), want_len, "size of version {}", c as char);
                assert!(data.iter().all(|&b| b == c), "mixed content");
                n += 1;
            }
            n
        })
    };
    for v in 1..=9u8 {
        let tmp = m.path("tmp");
        fs::write(&tmp, vec![b'0' + v; 10000 + v as usize * 777]).unwrap();
        fs::rename(&tmp, &target).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(t.join().unwrap() > 0);
}

#[test]
fn damaged_header_gives_eio_for_that_file_only() {
    let vol = Volume::new();
    {
        let m = vol.mount(&[]);
        fs::write(m.path("good"), b"good data").unwrap();
        fs::write(m.path("bad"), b"bad data").unwrap();
        fs::write(m.path("short"), b"short").unwrap();
    }
    let mut h = fs::read(vol.backing.join("bad")).unwrap();
    h[20] ^= 0xff;
    fs::write(vol.backing.join("bad"), h).unwrap();
    fs::write(vol.backing.join("short"), b"tiny").unwrap();
    fs::write(vol.backing.join("foreign"), vec![7u8; 5000]).unwrap();
    let m = vol.mount(&[]);
    for name in ["bad", "short", "foreign"] {
        let e = fs::read(m.path(name)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}");
    }
    assert_eq!(fs::read(m.path("good")).unwrap(), b"good data");
    fs::write(m.path("new"), b"still works").unwrap();
    assert_eq!(fs::read(m.path("new")).unwrap(), b"still works");
    let log = vol.log_text();
    for name in ["bad", "short", "foreign"] {
        let p = vol.backing.join(name);
        assert_eq!(
            log.lines()
                .filter(|l| l.contains(&format!("path={} ", p.display())))
                .count(),
            1,
            "one line for {name} in:\n{log}"
        );
    }
}

#[test]
fn allow_other_uses_caller_ids_and_kernel_permissions() {
    let vol = Volume::new();
    let m = vol.mount_for_others();
    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(m.path("secret"), b"root only").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_nobody(&format!("cat {}", m.path("secret").display()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = as_nobody(&format!(
        "echo hi > {0}/f && mkdir {0}/d",
        m.path("shared").display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in ["shared/f", "shared/d"] {
        let md = fs::metadata(m.path(n)).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534), "{n}");
    }
}

#[test]
fn mount_failures_have_their_own_exit_codes() {
    let vol = Volume::new();
    let backing = vol.backing.to_str().unwrap();
    // Exit code and stderr of `earfs mount BACKING MOUNTPOINT`.
    let mount_code = |backing: &str, mnt: &std::path::Path| {
        let out = run(&["mount", backing, mnt.to_str().unwrap()]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let code = |out: std::process::Output| {
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Not a volume.
    let plain = vol.dir.path().join("plain");
    fs::create_dir(&plain).unwrap();
    let (c, err) = mount_code(plain.to_str().unwrap(), &vol.mnt);
    assert_eq!(c, Some(10), "{err}");
    assert!(err.contains("not an earfs volume"));
    // Non-empty mountpoint.
    let full = vol.dir.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"x").unwrap();
    let (c, err) = mount_code(backing, &full);
    assert_eq!(c, Some(16), "{err}");
    // Missing mountpoint.
    let (c, err) = mount_code(backing, std::path::Path::new("/nonexistent/earfs-mnt"));
    assert_eq!(c, Some(19), "{err}");
    {
        let _m = vol.mount(&[]);
        // Second mount of the same volume elsewhere: refused by the lock.
        let other = vol.dir.path().join("mnt2");
        fs::create_dir(&other).unwrap();
        let (c, err) = mount_code(backing, &other);
        assert_eq!(c, Some(18), "{err}");
        assert!(!is_mounted(&other));
        // Mountpoint that already is a mount.
        let (c, err) = code(vol.try_mount(&[]));
        assert_eq!(c, Some(17), "{err}");
    }
    // The key file's own failures (KMS providers: tests/kms.rs).
    if common::kms::provider_under_test() == "local" {
        // Key file readable by others.
        fs::set_permissions(&vol.key, fs::Permissions::from_mode(0o644)).unwrap();
        let (c, err) = code(vol.try_mount(&[]));
        assert_eq!(c, Some(13), "{err}");
        assert!(err.contains("chmod 600"));
        fs::set_permissions(&vol.key, fs::Permissions::from_mode(0o600)).unwrap();
        // Wrong key file.
        let saved = fs::read(&vol.key).unwrap();
        let other = vol.dir.path().join("otherkey");
        let v2 = vol.dir.path().join("v2");
        init_local(&other, &v2);
        fs::copy(&other, &vol.key).unwrap();
        let (c, err) = code(vol.try_mount(&[]));
        assert_eq!(c, Some(14), "{err}");
        fs::write(&vol.key, &saved).unwrap();
        // Missing key file.
        fs::rename(&vol.key, vol.dir.path().join("moved-key")).unwrap();
        let (c, err) = code(vol.try_mount(&[]));
        assert_eq!(c, Some(12), "{err}");
        fs::rename(vol.dir.path().join("moved-key"), &vol.key).unwrap();
    }
    // Changed earfs.conf.
    let conf = vol.backing.join("earfs.conf");
    let text = fs::read_to_string(&conf).unwrap();
    fs::write(&conf, text.replace("volume_id = \"", "volume_id = \"0")).unwrap();
    let (c, err) = code(vol.try_mount(&[]));
    assert_eq!(c, Some(15), "{err}");
    fs::write(&conf, text).unwrap();
    // And it mounts again once all is right.
    let _m = vol.mount(&[]);
}

#[test]
fn killed_daemon_leaves_an_erroring_mount_that_umount_clears_and_fsynced_data_survives() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("durable"))
        .unwrap();
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let pid = daemon_pid(&vol);
    signal(pid, rustix::process::Signal::KILL);
    // The mount now errors instead of showing the bare directory.
    let errored = wait_until(5, || match fs::metadata(m.path("durable")) {
        Ok(_) => false,
        Err(e) => {
            let code = e.raw_os_error();
            assert!(
                code == Some(libc::ENOTCONN) || code == Some(libc::ECONNABORTED),
                "{e}"
            );
            true
        }
    });
    assert!(errored, "a dead daemon's mount must error");
    // `earfs umount` clears it.
    earfs_ok(&["umount", vol.mnt.to_str().unwrap()]);
    assert!(!is_mounted(&vol.mnt));
    let m2 = vol.mount(&[]);
    assert_eq!(fs::read(m2.path("durable")).unwrap(), data);
    // A new mount clears a crashed daemon's dead mount by itself (and says so).
    signal(daemon_pid(&vol), rustix::process::Signal::KILL);
    assert!(wait_until(5, || fs::metadata(m2.path("durable")).is_err()));
    let m3 = vol.mount(&[]);
    assert!(
        vol.log_text().contains("cleared the dead mount"),
        "{}",
        vol.log_text()
    );
    assert_eq!(fs::read(m3.path("durable")).unwrap(), data);
    drop(m3);
    drop(m);
}

#[test]
fn daemon_memory_is_locked() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    fs::write(m.path("f"), b"x").unwrap();
    let status = fs::read_to_string(format!("/proc/{}/status", daemon_pid(&vol))).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(locked_kb > 0, "{status}");
}

#[test]
fn sigterm_unmounts_and_the_daemon_exits() {
    let vol = Volume::new();
    let m = vol.mount(&[]);
    fs::write(m.path("f"), b"kept").unwrap();
    let pid = daemon_pid(&vol);
    signal(pid, rustix::process::Signal::TERM);
    let gone = wait_until(5, || {
        !is_mounted(&vol.mnt) && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(gone, "mount or daemon still there after SIGTERM");
    assert!(
        vol.log_text()
            .contains(&format!("unmounted {}", vol.mnt.display()))
    );
    drop(m);
    let m = vol.mount(&[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"kept");
}

#[test]
fn background_daemon_logs_to_syslog_without_a_log_file() {
    let vol = Volume::new();
    let sock_path = vol.dir.path().join("syslog.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let out = std::process::Command::new(earfs())
        .args([
            "mount",
            vol.backing.to_str().unwrap(),
            vol.mnt.to_str().unwrap(),
        ])
        .env("EARFS_SYSLOG_SOCKET", &sock_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _m = Mount { vol: &vol };
    // Every message is an info-level syslog datagram; one says the volume is mounted.
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.starts_with("<30>earfs["), "{msg}");
        if msg.contains("serving volume") {
            break;
        }
    }
}

#[test]
fn eio_from_the_backing_store_reaches_the_caller() {
    // earfs over earfs: the outer volume becomes a backing store that fails reads with
    // EIO (its backing file is cut behind its back), and the inner volume must pass
    // that errno on, never short or made-up data.
    let outer = Volume::new();
    let om = outer.mount(&[]);
    let inner_backing = om.path("inner-backing");
    let inner_key = outer.dir.path().join("inner-key");
    let inner_mnt = outer.dir.path().join("inner-mnt");
    fs::create_dir(&inner_mnt).unwrap();
    init_local(&inner_key, &inner_backing);
    let _im = mount_at(&inner_backing, &inner_mnt);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 199) as u8).collect();
    fs::write(inner_mnt.join("data"), &data).unwrap();
    assert_eq!(fs::read(inner_mnt.join("data")).unwrap(), data);
    // Cut the outer backing file: the outer daemon still believes the old size.
    let outer_file = outer.backing.join("inner-backing/data");
    let f = OpenOptions::new().write(true).open(&outer_file).unwrap();
    f.set_len(4096 + 4096 + 8192).unwrap();
    drop(f);
    // Drop the outer mount's page cache of that file (not its inode), and read the
    // inner file with O_DIRECT so that both requests reach the daemons.
    let of = File::open(om.path("inner-backing/data")).unwrap();
    rustix::fs::fadvise(&of, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    #[repr(C, align(4096))]
    struct Page([u8; 8192]);
    let mut buf = Box::new(Page([0u8; 8192]));
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(inner_mnt.join("data"))
        .unwrap();
    let e = f.read_at(&mut buf.0, 32768).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // The start of the file is intact and still reads.
    f.read_exact_at(&mut buf.0, 0).unwrap();
    assert_eq!(&buf.0[..], &data[..8192]);
    drop(of);
    // The EIO came from the outer daemon, the backing store of the inner one.
    let log = outer.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("op=read") && l.contains("errno=5")),
        "{log}"
    );
}

#[test]
fn info_and_speed_report_the_volume_and_the_cipher() {
    let vol = Volume::new();
    let out = earfs_ok(&["info", "--json", vol.backing.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let conf = fs::read_to_string(vol.backing.join("earfs.conf")).unwrap();
    assert!(conf.contains(v["volume_id"].as_str().unwrap()));
    assert_eq!(v["cipher"], "aes-256-xts");
    assert_eq!(v["sector_size"], 4096);
    assert_eq!(v["provider"], common::kms::provider_under_test());
    assert_eq!(v["key_versions"], serde_json::json!([1]));
    assert_eq!(
        v["aes_kernel"].as_str().unwrap(),
        earfs::crypto::implementation()
    );
    // The provider under test's key, as docs/schemas/info.v1.json has it.
    common::assert_follows_schema(&out);
    let out = earfs_ok(&["speed", "--json", "--seconds", "0.1"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sector_size"], 4096);
    assert!(v["encrypt_bytes_per_sec"].as_f64().unwrap() > 1e6);
    assert!(v["decrypt_bytes_per_sec"].as_f64().unwrap() > 1e6);
    let out = run(&["info", vol.dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(10));
}

#[test]
fn umount_of_a_non_earfs_path_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&["umount", d.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(22));
}

#[test]
fn enospc_reaches_the_caller_and_the_volume_recovers() {
    let d = tempfile::tempdir().unwrap();
    let small = d.path().join("small");
    fs::create_dir(&small).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "cannot mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(small.clone());
    let key = d.path().join("key");
    let backing = small.join("vol");
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    init_local(&key, &backing);
    // write() itself fails only without the writeback cache (on by default); under it
    // the error surfaces at fsync and close: tests/writeback.rs.
    let out = run(&[
        "mount",
        "--no-writeback-cache",
        backing.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _m = MountGuard(mnt.clone());
    fs::write(mnt.join("filler"), vec![1u8; 1 << 20]).unwrap();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(mnt.join("big"))
        .unwrap();
    let chunk: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    let mut written = 0usize;
    let err = loop {
        match f.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    drop(f);
    let got = fs::read(mnt.join("big")).unwrap();
    assert_eq!(got.len(), written, "no bytes past what write() reported");
    for (i, c) in got.chunks(chunk.len()).enumerate() {
        assert_eq!(c, &chunk[..c.len()], "chunk {i}");
    }
    fs::remove_file(mnt.join("filler")).unwrap();
    // The backing file goes away once the kernel forgets the inode (asynchronously).
    let mut f = OpenOptions::new()
        .append(true)
        .open(mnt.join("big"))
        .unwrap();
    let mut tries = 0;
    while let Err(e) = f.write_all(&chunk) {
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        tries += 1;
        assert!(tries < 100, "space never came back");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(f);
    assert_eq!(
        fs::metadata(mnt.join("big")).unwrap().len() as usize,
        written + chunk.len()
    );
}

#[test]
fn a_volume_of_an_unknown_format_is_refused_with_one_line() {
    let vol = Volume::new();
    let conf = vol.backing.join("earfs.conf");
    let text = fs::read_to_string(&conf).unwrap();
    let want = format!("format = {}", common::test_format().number());
    assert!(text.contains(&want), "{text}");
    fs::write(&conf, text.replace(&want, "format = 3")).unwrap();
    let out = vol.try_mount(&[]);
    // A bad config (docs/exit-codes.md), which the unit does not restart on.
    assert_eq!(out.status.code(), Some(11));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("format 3") && lines[0].contains("does not know"),
        "{err}"
    );
    assert!(!common::is_mounted(&vol.mnt));
}

/// Append `data` to the file at `path`.
fn append(path: &std::path::Path, data: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(data)
        .unwrap();
}

/// Run earfs, which must succeed; its standard output.
fn earfs_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "earfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The format a backing file's header names (bytes 8..10).
fn header_version(path: &std::path::Path) -> u16 {
    let h = fs::read(path).unwrap();
    u16::from_le_bytes([h[8], h[9]])
}

/// `earfs info --files --json BACKING`'s census.
fn census_of(backing: &std::path::Path) -> serde_json::Value {
    let out = earfs_ok(&["info", "--files", "--json", backing.to_str().unwrap()]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["files"].clone()
}

#[test]
fn upgrade_switches_a_v1_volume_to_v2_mounted_or_not_and_files_follow_the_rules() {
    use earfs::content::FileFormat;
    let vol = Volume::in_format(FileFormat::V1);
    let backing = vol.backing.to_str().unwrap();
    {
        let m = vol.mount(&[]);
        fs::write(m.path("odd"), b"hello").unwrap();
        fs::write(m.path("even"), [7u8; 32]).unwrap();
        let c = census_of(&vol.backing);
        assert_eq!(c["formats"], serde_json::json!({"1": 2}), "{c}");
        assert_eq!(c["v1_convertible"], 1, "{c}");

        // Through the running daemon.
        let said = earfs_ok(&["upgrade", backing]);
        assert!(
            said.contains("now writes format 2 (was 1; through the running daemon)"),
            "{said}"
        );
        let conf = fs::read_to_string(vol.backing.join("earfs.conf")).unwrap();
        assert!(conf.contains("format = 2"), "{conf}");

        // New files are v2 at once; an unaligned v1 file stays v1; an aligned one flips
        // before the write that leaves it unaligned; truncate to zero makes a v2 file.
        fs::write(m.path("new"), b"x").unwrap();
        assert_eq!(header_version(&m.backing("new")), 2);
        append(&m.path("odd"), b"!");
        assert_eq!(header_version(&m.backing("odd")), 1);
        append(&m.path("even"), b"abc");
        assert_eq!(header_version(&m.backing("even")), 2);
        assert_eq!(fs::read(m.path("odd")).unwrap(), b"hello!");
        assert_eq!(
            fs::read(m.path("even")).unwrap(),
            [&[7u8; 32][..], b"abc"].concat()
        );

        let out = earfs_ok(&["status", "--files", "--json", vol.mnt.to_str().unwrap()]);
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(st["format"], 2, "{st}");
        assert_eq!(
            st["files"]["formats"],
            serde_json::json!({"1": 1, "2": 2}),
            "{st}"
        );
        let text = earfs_ok(&["status", "--files", vol.mnt.to_str().unwrap()]);
        assert!(text.contains("format:        2 (new files)"), "{text}");
        assert!(text.contains("format 1:    1"), "{text}");

        fs::write(m.path("odd"), b"z").unwrap();
        assert_eq!(header_version(&m.backing("odd")), 2);
        assert_eq!(
            census_of(&vol.backing)["formats"],
            serde_json::json!({"2": 3})
        );
        // Again: nothing to do.
        assert!(earfs_ok(&["upgrade", backing]).contains("already writes format 2"));
    }
    let m = vol.mount(&[]);
    assert_eq!(fs::read(m.path("odd")).unwrap(), b"z");
    assert_eq!(
        fs::read(m.path("even")).unwrap(),
        [&[7u8; 32][..], b"abc"].concat()
    );
    drop(m);

    // Not mounted: earfs.conf is rewritten and authenticates at the next mount.
    let off = Volume::in_format(FileFormat::V1);
    {
        let m = off.mount(&[]);
        fs::write(m.path("old"), b"v1 bytes").unwrap();
    }
    let out = earfs_ok(&["upgrade", off.backing.to_str().unwrap()]);
    assert!(out.contains("(was 1; not mounted"));
    let m = off.mount(&[]);
    assert_eq!(fs::read(m.path("old")).unwrap(), b"v1 bytes");
    fs::write(m.path("fresh"), b"v2").unwrap();
    assert_eq!(header_version(&m.backing("fresh")), 2);
    assert_eq!(header_version(&m.backing("old")), 1);
}

/// The key version a backing file's header names (bytes 12..16).
fn header_key_version(path: &std::path::Path) -> u32 {
    let h = fs::read(path).unwrap();
    u32::from_le_bytes([h[12], h[13], h[14], h[15]])
}

#[test]
fn rotate_makes_a_new_current_version_mounted_or_not_and_old_files_keep_reading() {
    let vol = Volume::new();
    let backing = vol.backing.to_str().unwrap();
    let conf = vol.backing.join("earfs.conf");
    let before_rotation = fs::read(&conf).unwrap();
    {
        let m = vol.mount(&[]);
        fs::write(m.path("one"), b"under version 1").unwrap();
        let said = earfs_ok(&["rotate", backing]);
        assert!(
            said.contains("version 2 is current (was 1; through the running daemon)"),
            "{said}"
        );
        // Through the same mount: new files take version 2 at once; truncating an old
        // file to zero gives it a new header of version 2; old files keep reading.
        fs::write(m.path("two"), b"under version 2").unwrap();
        fs::write(m.path("again"), b"x").unwrap();
        assert_eq!(header_key_version(&m.backing("one")), 1);
        assert_eq!(header_key_version(&m.backing("two")), 2);
        fs::write(m.path("one-copy"), fs::read(m.path("one")).unwrap()).unwrap();
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path("again"))
            .unwrap();
        fs::write(m.path("again"), b"y").unwrap();
        assert_eq!(header_key_version(&m.backing("again")), 2);
        assert_eq!(fs::read(m.path("one")).unwrap(), b"under version 1");
        let out = earfs_ok(&["status", "--json", vol.mnt.to_str().unwrap()]);
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(st["key_versions"], serde_json::json!([1, 2]), "{st}");
        assert_eq!(st["current_key_version"], 2, "{st}");
    }
    // Not mounted: version 3.
    let out = earfs_ok(&["rotate", backing]);
    assert!(out.contains("version 3 is current (was 2; not mounted"));
    let out = earfs_ok(&["keys", "--json", backing]);
    let k: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(k["current_key_version"], 3, "{k}");
    let per: Vec<(u64, u64)> = k["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["files"].as_u64().unwrap()))
        .collect();
    assert_eq!(per, [(1, 1), (2, 3), (3, 0)], "{k}");
    {
        let m = vol.mount(&[]);
        assert_eq!(fs::read(m.path("one")).unwrap(), b"under version 1");
        assert_eq!(fs::read(m.path("two")).unwrap(), b"under version 2");
        fs::write(m.path("three"), b"under version 3").unwrap();
        assert_eq!(header_key_version(&m.backing("three")), 3);
    }
    // A keyring that lacks a version (here: the config from before the rotations)
    // cannot read files written under it: EIO and a log line naming the version, never
    // garbage; files of the versions it holds keep reading.
    fs::write(&conf, &before_rotation).unwrap();
    let m = vol.mount(&[]);
    assert_eq!(fs::read(m.path("one")).unwrap(), b"under version 1");
    let e = fs::read(m.path("two")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(m);
    let log = vol.log_text();
    assert!(log.contains("key version 2"), "{log}");
    // A config changed by hand is refused before a new key is made, and left as it
    // was (exit 15, as at a mount).
    let text = fs::read_to_string(&conf).unwrap();
    let n = common::test_format().number();
    let edited = text.replacen(&format!("format = {n}"), &format!("format = {}", 3 - n), 1);
    assert_ne!(edited, text);
    fs::write(&conf, &edited).unwrap();
    let out = run(&["rotate", backing]);
    assert_eq!(
        out.status.code(),
        Some(15),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
}

/// The key versions and file counts `earfs keys --json BACKING` shows.
fn key_files(backing: &str) -> Vec<(u64, u64)> {
    let out = earfs_ok(&["keys", "--json", backing]);
    let k: serde_json::Value = serde_json::from_str(&out).unwrap();
    k["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["files"].as_u64().unwrap()))
        .collect()
}

/// The standard error of an earfs run that must have failed with `code`.
fn failed_with(code: i32, out: std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{err}");
    err
}

#[test]
fn retire_key_refuses_while_files_use_the_version_then_drops_it() {
    let vol = Volume::new();
    let backing = vol.backing.to_str().unwrap();
    let conf = vol.backing.join("earfs.conf");
    let retire = |v: &str| run(&["retire-key", backing, "--version", v]);
    {
        let m = vol.mount(&[]);
        fs::write(m.path("old"), b"under version 1").unwrap();
        fs::write(m.path("gone"), b"version 1, unlinked while open").unwrap();
    }
    // The current version cannot be retired (rotate first); nor can an absent one.
    let err = failed_with(2, retire("1"));
    assert!(
        err.contains("current") && err.contains("earfs rotate"),
        "{err}"
    );
    earfs_ok(&["rotate", backing]);
    let err = failed_with(2, retire("7"));
    assert!(err.contains("no key version 7"), "{err}");

    // Not mounted: two files use version 1; refused with the count, earfs.conf kept.
    let before = fs::read(&conf).unwrap();
    let err = failed_with(31, retire("1"));
    assert!(
        err.contains(
            "2 files still use key version 1 (2 in the backing directory); run `earfs reencrypt` (mounted or not), or remove them, first; `earfs keys` counts them"
        ),
        "{err}"
    );
    assert_eq!(fs::read(&conf).unwrap(), before);
    {
        let m = vol.mount(&[]);
        // A hard link is another name of the same file: still two files.
        fs::hard_link(m.path("old"), m.path("old-link")).unwrap();
        let err = failed_with(31, retire("1"));
        assert!(
            err.contains("2 files still use key version 1 (2 in the backing directory)"),
            "{err}"
        );
        // A file unlinked while open has no name in the backing directory any more, but
        // the daemon still holds it (and may read it).
        let mut held = File::open(m.path("gone")).unwrap();
        fs::remove_file(m.path("gone")).unwrap();
        assert!(!m.backing("gone").exists());
        let err = failed_with(31, retire("1"));
        assert!(
            err.contains(
                "2 files still use key version 1 (1 in the backing directory, 1 open and unlinked in the running daemon)"
            ),
            "{err}"
        );
        // The protocol underneath: the daemon's open files by version, with its count
        // of renames; a rename since the count the request names makes it refuse (the
        // command then counts again), before it looks at its open files.
        let sock = earfs::daemon::control::socket_path(&fs::canonicalize(&vol.mnt).unwrap());
        let ask = |what: &str| {
            earfs::daemon::control::request_reply(&sock, what, std::time::Duration::from_secs(30))
                .unwrap()
        };
        let open = ask("open-files");
        assert_eq!(open["unlinked"], serde_json::json!({"1": 1}), "{open}");
        let moves = open["moves"].as_u64().unwrap();
        fs::rename(m.path("old-link"), m.path("old-link2")).unwrap();
        fs::rename(m.path("old-link2"), m.path("old-link")).unwrap();
        let v = ask(&format!("retire 1 {moves}"));
        assert_eq!(v["moved"], true, "{v}");
        let moves = ask("open-files")["moves"].as_u64().unwrap();
        let v = ask(&format!("retire 1 {moves}"));
        assert_eq!(
            v["in_use"],
            serde_json::json!({"named": 0, "unlinked": 1, "unreadable": 0}),
            "{v}"
        );
        assert!(
            ask("retire x")["error"]
                .as_str()
                .unwrap()
                .contains("bad request")
        );
        assert_eq!(fs::read(&conf).unwrap(), before);
        // Rewrite the named one under the current key (truncate to zero, then write):
        // both its names now name version 2.
        fs::write(m.path("old"), b"now under version 2").unwrap();
        assert_eq!(header_key_version(&m.backing("old-link")), 2);
        let err = failed_with(31, retire("1"));
        assert!(
            err.contains(
                "1 file still uses key version 1 (0 in the backing directory, 1 open and unlinked in the running daemon)"
            ),
            "{err}"
        );
        let mut text = Vec::new();
        held.read_to_end(&mut text).unwrap();
        assert_eq!(text, b"version 1, unlinked while open");
        assert_eq!(fs::read(&conf).unwrap(), before);
        // Closed: the kernel releases the handle and forgets the inode soon after
        // close() returns; until then the daemon still counts it.
        drop(held);
        let mut said = String::new();
        assert!(
            wait_until(10, || {
                let out = retire("1");
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    said = String::from_utf8_lossy(&out.stdout).into_owned();
                    return true;
                }
                assert_eq!(out.status.code(), Some(31), "{err}");
                assert!(err.contains("open and unlinked"), "{err}");
                false
            }),
            "retire-key still refused after the file was closed"
        );
        assert!(
            said.contains("key version 1 retired (through the running daemon)"),
            "{said}"
        );
        assert_eq!(key_files(backing), [(2, 1)]);
        let out = earfs_ok(&["status", "--json", vol.mnt.to_str().unwrap()]);
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(st["key_versions"], serde_json::json!([2]), "{st}");
        // The running daemon keeps serving with the keyring it switched to.
        assert_eq!(
            fs::read(m.path("old-link")).unwrap(),
            b"now under version 2"
        );
        fs::write(m.path("new"), b"also version 2").unwrap();
        // Again: version 1 is no longer in the keyring.
        let err = failed_with(2, retire("1"));
        assert!(err.contains("no key version 1"), "{err}");
    }
    // Not mounted, once no file uses the version: version 2 goes after a rotation and
    // a rewrite of its files.
    earfs_ok(&["rotate", backing]);
    let err = failed_with(31, retire("2"));
    assert!(
        err.contains("2 files still use key version 2 (2 in the backing directory)"),
        "{err}"
    );
    {
        let m = vol.mount(&[]);
        fs::write(m.path("new"), b"under version 3").unwrap();
        fs::write(m.path("old"), b"old, under version 3").unwrap();
    }
    let said = earfs_ok(&["retire-key", backing, "--version", "2"]);
    assert!(
        said.contains("key version 2 retired (not mounted: earfs.conf rewritten)"),
        "{said}"
    );
    assert_eq!(key_files(backing), [(3, 2)]);
    let conf_text = fs::read_to_string(&conf).unwrap();
    assert!(!conf_text.contains("version = 2"), "{conf_text}");
    // Everything reads back after a remount (earfs.conf authenticates).
    let m = vol.mount(&[]);
    assert_eq!(fs::read(m.path("old")).unwrap(), b"old, under version 3");
    assert_eq!(
        fs::read(m.path("old-link")).unwrap(),
        b"old, under version 3"
    );
    assert_eq!(fs::read(m.path("new")).unwrap(), b"under version 3");
}
