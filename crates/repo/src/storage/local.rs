//! A repository in a local directory (or any mounted filesystem). Writes go
//! to `tmp/` and are renamed into place after `fsync` (see rename(2): atomic
//! within one filesystem), so a crash never leaves a torn object under its key.
//!
//! Large objects (packs, WAL segments) are written with `O_DIRECT` where the
//! filesystem allows it: copying them into the page cache cost about as much
//! CPU as compressing them (896 MiB took 2.6 s of system time buffered, 0.14 s
//! direct, on the benchmark machine), and nothing reads a pack right after
//! writing it.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{
    list_dir, validate_key, MinFreeSpace, ObjectSize, Storage, StorageError, StorageResult,
};

/// A repository in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    min_free: MinFreeSpace,
}

impl LocalStorage {
    /// A store in the directory `root` (created when absent).
    pub fn new(root: impl Into<PathBuf>) -> StorageResult<Self> {
        let root = root.into();
        private_dirs(&root.join("tmp")).map_err(|source| StorageError::Io {
            key: root.display().to_string(),
            source,
        })?;
        close_root(&root).map_err(|source| StorageError::Io {
            key: root.display().to_string(),
            source,
        })?;
        Ok(LocalStorage {
            root,
            min_free: MinFreeSpace::default(),
        })
    }

    /// Keeps `min_free` free on the repository's file system: a write that
    /// would leave less is refused (see [`MinFreeSpace`]).
    pub fn with_min_free(mut self, min_free: MinFreeSpace) -> Self {
        self.min_free = min_free;
        self
    }

    /// The directory the store writes in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Objects under `prefix`, sorted by key, skipping `tmp/`; sizes are
    /// read only when `sizes` is set (one `stat` per file).
    fn walk(&self, prefix: &str, sizes: bool) -> StorageResult<Vec<ObjectSize>> {
        let mut objects = Vec::new();
        let start = match list_dir(prefix)? {
            None => self.root.clone(),
            Some(dir) => self.root.join(dir),
        };
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => continue,
                Err(source) => {
                    return Err(StorageError::Io {
                        key: prefix.to_string(),
                        source,
                    })
                }
            };
            for entry in entries {
                let entry = entry.map_err(io_err(prefix))?;
                let path = entry.path();
                let file_type = entry.file_type().map_err(io_err(prefix))?;
                if file_type.is_dir() {
                    if path != self.root.join("tmp") {
                        stack.push(path);
                    }
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    let key = rel.to_string_lossy().into_owned();
                    let size = if sizes {
                        match entry.metadata() {
                            Ok(m) => m.len(),
                            // Deleted since the directory was read.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(io_err(&key)(e)),
                        }
                    } else {
                        0
                    };
                    objects.push(ObjectSize { key, size });
                }
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    fn path_of(&self, key: &str) -> StorageResult<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

/// Objects at least this large are written with `O_DIRECT`.
const DIRECT_MIN: usize = 1 << 20;
/// Alignment of direct I/O buffers, offsets and lengths (the largest
/// logical block size in use).
const DIRECT_ALIGN: usize = 4096;
/// Bytes copied into the aligned buffer per `write`.
const DIRECT_CHUNK: usize = 4 << 20;

/// A heap buffer aligned for direct I/O.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialized bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Writes `data` to a new file at `path` with `O_DIRECT`, through an aligned
/// bounce buffer; the last partial block is padded with zeros and the file
/// cut back to `data.len()`. `Ok(None)` when the filesystem refuses direct
/// I/O (tmpfs, some network filesystems): the caller writes it buffered.
fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<Option<fs::File>> {
    use std::os::unix::fs::FileExt;
    let file = match fs::OpenOptions::new()
        .mode(0o600)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = AlignedBuf::new(DIRECT_CHUNK);
    let mut offset = 0usize;
    while offset < data.len() {
        let n = (data.len() - offset).min(DIRECT_CHUNK);
        let padded = n.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let chunk = &mut buf.as_mut_slice()[..padded];
        chunk[..n].copy_from_slice(&data[offset..offset + n]);
        chunk[n..].fill(0);
        match file.write_all_at(chunk, offset as u64) {
            Ok(()) => {}
            // Alignment the device does not accept: write it buffered.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && offset == 0 => {
                drop(file);
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        offset += n;
    }
    file.set_len(data.len() as u64)?;
    Ok(Some(file))
}

/// Makes a repository created before objects were private (or by hand)
/// private too: its root becomes 0700 when it is ours and open to others.
fn close_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::metadata(root)?;
    // SAFETY: geteuid has no preconditions.
    let ours = meta.uid() == unsafe { libc::geteuid() };
    if ours && meta.mode() & 0o077 != 0 {
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates `dir` and its missing parents as 0700: a repository's objects
/// (0600) are its owner's alone, whatever the umask.
fn private_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn io_err(key: &str) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            StorageError::NotFound(key.to_string())
        } else {
            StorageError::Io {
                key: key.to_string(),
                source,
            }
        }
    }
}

impl Storage for LocalStorage {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        let target = self.path_of(key)?;
        self.min_free.check(&self.root, key, data.len() as u64)?;
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{:016x}",
            std::process::id(),
            target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            rand::random::<u64>()
        ));
        let write = || -> std::io::Result<()> {
            if let Some(parent) = target.parent() {
                private_dirs(parent)?;
            }
            let file = match data.len() >= DIRECT_MIN {
                true => write_direct(&tmp, data)?,
                false => None,
            };
            let file = match file {
                Some(file) => file,
                None => {
                    let mut file = fs::OpenOptions::new()
                        .mode(0o600)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&tmp)?;
                    file.write_all(data)?;
                    file
                }
            };
            file.sync_all()?;
            fs::rename(&tmp, &target)?;
            if let Some(parent) = target.parent() {
                fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        };
        let result = write();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(key))
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        fs::read(self.path_of(key)?).map_err(io_err(key))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        let path = self.path_of(key)?;
        let read = || -> std::io::Result<Vec<u8>> {
            let mut file = fs::File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(len as usize);
            file.take(len).read_to_end(&mut buf)?;
            Ok(buf)
        };
        let buf = read().map_err(io_err(key))?;
        if buf.len() as u64 != len {
            return Err(StorageError::ShortRead {
                key: key.to_string(),
                offset,
                len,
            });
        }
        Ok(buf)
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        Ok(self
            .walk(prefix, false)?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        self.walk(prefix, true)
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        match fs::remove_file(self.path_of(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        Ok(self.path_of(key)?.exists())
    }

    /// Two: one pack's write overlaps the other's `fsync`; more only
    /// queue on the same disk.
    fn concurrent_puts(&self) -> usize {
        2
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let s = LocalStorage::new(&root)
            .unwrap()
            .with_min_free(crate::MinFreeSpace::NONE);
        s.put("packs/ab/small", b"x").unwrap();
        s.put("packs/ab/large", &vec![7u8; DIRECT_MIN + 10])
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for d in [
            root.clone(),
            root.join("tmp"),
            root.join("packs"),
            root.join("packs/ab"),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        for f in ["packs/ab/small", "packs/ab/large"] {
            assert_eq!(mode(&root.join(f)), 0o600, "{f}");
        }
    }

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        s.put("a/b/c", b"hello").unwrap();
        s.put("a/d", b"world").unwrap();
        assert_eq!(s.get("a/b/c").unwrap(), b"hello");
        assert_eq!(s.get_range("a/b/c", 1, 3).unwrap(), b"ell");
        assert!(s.get_range("a/b/c", 3, 10).is_err());
        assert_eq!(s.list("a").unwrap(), vec!["a/b/c", "a/d"]);
        assert_eq!(s.list("").unwrap(), vec!["a/b/c", "a/d"]);
        s.delete("a/d").unwrap();
        assert!(matches!(s.get("a/d"), Err(StorageError::NotFound(_))));
        assert!(matches!(
            s.put("../x", b""),
            Err(StorageError::InvalidKey(_))
        ));
    }

    /// Large objects take the direct-I/O path: sizes on and around the
    /// alignment and chunk boundaries come back byte for byte, replacing
    /// an older object of another size.
    #[test]
    fn large_objects_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        for len in [
            DIRECT_MIN,
            DIRECT_MIN + 1,
            DIRECT_CHUNK - 1,
            DIRECT_CHUNK + DIRECT_ALIGN,
            2 * DIRECT_CHUNK + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            s.put("packs/p", &data).unwrap();
            assert_eq!(s.get("packs/p").unwrap(), data, "length {len}");
            assert_eq!(
                s.get_range("packs/p", len as u64 - 10, 10).unwrap(),
                &data[len - 10..]
            );
        }
        // Nothing is left behind in tmp/.
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
