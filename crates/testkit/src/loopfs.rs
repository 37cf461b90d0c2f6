//! Real file systems for tests: a sparse image file formatted as XFS (`-m reflink=1`), btrfs or
//! ext4, attached to a loop device and mounted under a fresh directory in `/tmp`. Unmounted,
//! detached and removed on drop, also when the test panics.
//!
//! Needs root, the `mkfs.*` tool (`scripts/install-test-deps.sh` installs xfsprogs and
//! btrfs-progs), kernel support for the file system and a free loop device. When one of those
//! is missing [`LoopFs::create`] returns [`LoopFsUnavailable`] saying which, and tests skip
//! with that message (see [`LoopFs::or_skip`]); any later failure panics.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{is_root, keep_test_dirs, run_output, PG_OS_USER};

/// The file systems [`LoopFs`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// XFS with reflink (`mkfs.xfs -m reflink=1`); at least 300 MiB.
    Xfs,
    /// btrfs; at least 110 MiB (mixed block groups below 1 GiB).
    Btrfs,
    /// ext4 (no reflink: for refusals).
    Ext4,
}

impl FsKind {
    fn name(self) -> &'static str {
        match self {
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Ext4 => "ext4",
        }
    }

    fn mkfs(self, image: &Path) -> Command {
        let mut cmd = Command::new(format!("mkfs.{}", self.name()));
        match self {
            FsKind::Xfs => cmd.args(["-q", "-f", "-m", "reflink=1"]),
            // Mixed data/metadata block groups waste less of a small image.
            FsKind::Btrfs => cmd.args(["-q", "-f", "--mixed"]),
            FsKind::Ext4 => cmd.args(["-q", "-F"]),
        };
        cmd.arg(image);
        cmd
    }
}

/// Why a loop-mounted file system cannot be made on this machine.
#[derive(Debug, Clone)]
pub struct LoopFsUnavailable(pub String);

impl std::fmt::Display for LoopFsUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A mounted loop file system; see the module documentation.
#[derive(Debug)]
pub struct LoopFs {
    kind: FsKind,
    root: PathBuf,
    mount: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl LoopFs {
    /// Makes a `size_mib` MiB file system of `kind` and mounts it; its root is given to the
    /// `postgres` OS user (mode 0755) when `for_postgres`, so clusters can live on it.
    pub fn create(
        kind: FsKind,
        size_mib: u64,
        for_postgres: bool,
    ) -> Result<LoopFs, LoopFsUnavailable> {
        let unavailable = |m: String| {
            Err(LoopFsUnavailable(format!(
                "{} loop file system unavailable: {m}",
                kind.name()
            )))
        };
        if !is_root() {
            return unavailable("needs root (mount, losetup)".into());
        }
        let tool = format!("mkfs.{}", kind.name());
        if !tool_exists(&tool) {
            return unavailable(format!(
                "{tool} not installed (scripts/install-test-deps.sh installs it)"
            ));
        }
        if !kernel_has(kind.name()) {
            return unavailable(format!("the kernel does not support {}", kind.name()));
        }
        let root = tempfile::Builder::new()
            .prefix(&format!("strata-{}-", kind.name()))
            .tempdir_in("/tmp")
            .expect("create temp dir")
            .keep();
        let image = root.join("fs.img");
        let mount = root.join("mnt");
        std::fs::create_dir(&mount).expect("create mount point");
        let mut fs = LoopFs {
            kind,
            root,
            mount,
            device: None,
            mounted: false,
        };
        let file = std::fs::File::create(&image).expect("create image");
        file.set_len(size_mib << 20).expect("size image");
        drop(file);
        let out = run_output(&mut kind.mkfs(&image));
        assert!(
            out.status.success(),
            "{}",
            crate::describe_failure(&tool, &out)
        );
        let out = run_output(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image),
        );
        if !out.status.success() {
            return unavailable(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        fs.device = Some(device.clone());
        let out = run_output(
            Command::new("mount")
                .args(["-t", kind.name(), &device])
                .arg(&fs.mount),
        );
        if !out.status.success() {
            return unavailable(format!(
                "mount: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        fs.mounted = true;
        if for_postgres {
            let out = run_output(
                Command::new("chown")
                    .arg(format!("{PG_OS_USER}:{PG_OS_USER}"))
                    .arg(&fs.mount),
            );
            assert!(
                out.status.success(),
                "{}",
                crate::describe_failure("chown", &out)
            );
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fs.mount, std::fs::Permissions::from_mode(0o755))
            .expect("chmod mount");
        Ok(fs)
    }

    /// [`LoopFs::create`], or `None` after printing why the test is skipped.
    pub fn or_skip(kind: FsKind, size_mib: u64, for_postgres: bool) -> Option<LoopFs> {
        match LoopFs::create(kind, size_mib, for_postgres) {
            Ok(fs) => Some(fs),
            Err(e) => {
                eprintln!("SKIP: {e}");
                None
            }
        }
    }

    /// The mounted file system's root.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Which file system it is.
    pub fn kind(&self) -> FsKind {
        self.kind
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let ok = run_output(Command::new("umount").arg(&self.mount))
                .status
                .success();
            if !ok {
                // Something still holds it (a process a failed test left): detach lazily.
                let _ = run_output(Command::new("umount").arg("-l").arg(&self.mount));
            }
        }
        if let Some(device) = &self.device {
            let _ = run_output(Command::new("losetup").args(["-d", device]));
        }
        if keep_test_dirs() {
            eprintln!("keeping {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn tool_exists(tool: &str) -> bool {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .any(|dir| dir.join(tool).is_file())
}

/// Whether the kernel knows file system `name` (loading its module if needed).
fn kernel_has(name: &str) -> bool {
    let listed = || {
        std::fs::read_to_string("/proc/filesystems")
            .map(|t| t.lines().any(|l| l.split_whitespace().last() == Some(name)))
            .unwrap_or(false)
    };
    if listed() {
        return true;
    }
    let _ = run_output(Command::new("modprobe").arg(name));
    listed()
}
