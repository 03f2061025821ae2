//! A small filesystem that really fills up: a `tmpfs` of a given size mounted on a fresh temp
//! dir, for tests that need a genuine `ENOSPC` (not just a low free-space reading).
//!
//! Needs root, or passwordless `sudo` for `mount` / `umount` (the tmpfs then belongs to the
//! test's user); the test VMs and CI run as root. A mount that fails is a panic with the reason,
//! never a silent skip: a test that cannot build its world must not pass. The mount is removed
//! when the guard drops (lazily, `umount -l`, if something still holds it), also while a test
//! panics. Drop the stowage using it first (declare the [`Tmpfs`] before it).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted on drop.
pub struct Tmpfs {
    /// The temp dir the tmpfs is mounted on (removed after the unmount).
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    size: u64,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes (rounded up to pages by the kernel) on a fresh temp dir.
    pub fn mount(size: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("stowage-tmpfs-")
            .tempdir()
            .expect("temp dir for a tmpfs mount point");
        let path = dir.path().to_owned();
        let (uid, gid) = (id("-u"), id("-g"));
        let out = privileged("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755,uid={uid},gid={gid}"))
            .arg("tmpfs")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `mount` for a tmpfs at {}: {e}", path.display())
            });
        assert!(
            out.status.success(),
            "could not mount a {size}-byte tmpfs at {} ({}): {}\n\
             this test needs root (or passwordless sudo) and tmpfs mounts (CI has both)",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let t = Tmpfs {
            dir: Some(dir),
            path,
            size,
        };
        assert!(
            t.is_mounted(),
            "`mount` succeeded but {} is not a mount point",
            t.path.display()
        );
        t
    }

    /// Where the tmpfs is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size asked for.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Free bytes on the tmpfs now (what stowage's free-space pre-check sees).
    pub fn available(&self) -> u64 {
        fs2::available_space(&self.path)
            .unwrap_or_else(|e| panic!("statvfs {}: {e}", self.path.display()))
    }

    fn is_mounted(&self) -> bool {
        Command::new("mountpoint")
            .arg("-q")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = privileged("umount").arg(&self.path).output();
        if !matches!(&plain, Ok(o) if o.status.success()) && self.is_mounted() {
            // Busy (a process still has a file open there): detach it now, the kernel frees it
            // when the last user goes.
            let lazy = privileged("umount").arg("-l").arg(&self.path).output();
            if !matches!(&lazy, Ok(o) if o.status.success()) {
                eprintln!(
                    "could not unmount the tmpfs at {}: {plain:?} / {lazy:?}",
                    self.path.display()
                );
                // Leave the (mounted) dir alone rather than delete the tmpfs's contents.
                if let Some(d) = self.dir.take() {
                    let _ = d.keep();
                }
                return;
            }
        }
        // The mount point is an empty dir again; TempDir removes it.
        drop(self.dir.take());
    }
}

/// `id -u` / `id -g` of the test process.
fn id(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("run `id`");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `program` as root: directly when the test runs as root, else through `sudo -n`.
fn privileged(program: &str) -> Command {
    if id("-u") == "0" {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}
