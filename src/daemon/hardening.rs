//! Process hardening: key material kept out of swap and core dumps, no second umask,
//! and as many descriptors as the process may have.

/// Keep key material out of swap: lock every page of the process as it is touched
/// (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`). Only where it cannot make later
/// allocations fail: with CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK.
fn lock_memory() {
    use rustix::mm::{MlockAllFlags, mlockall};
    let can = rustix::thread::capabilities(None)
        .map(|c| {
            c.effective
                .contains(rustix::thread::CapabilitySet::IPC_LOCK)
        })
        .unwrap_or(false)
        || rustix::process::getrlimit(rustix::process::Resource::Memlock)
            .current
            .is_none();
    if !can {
        log::warn!(
            "key material is not locked in memory (no CAP_IPC_LOCK, RLIMIT_MEMLOCK limited); it may be swapped out"
        );
        return;
    }
    if let Err(e) =
        mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
    {
        log::warn!("key material is not locked in memory: mlockall: {e}");
    }
}

/// For commands that hold plaintext keys (init, kms-check, export-keyring): keep them
/// out of swap and out of core dumps.
pub fn protect_key_material() {
    lock_memory();
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
}

pub(super) fn prepare_process() {
    // The kernel has applied the caller's umask to every mode it sends; ours must not
    // apply again when the backing objects are created.
    rustix::process::umask(rustix::fs::Mode::empty());
    // No swap, no core dumps: the process holds key material.
    protect_key_material();
    // Every inode the kernel holds is an O_PATH descriptor: allow as many as we may.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}
