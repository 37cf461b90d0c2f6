//! A backup set as a download: the layout `pg_basebackup -Ft -X stream`
//! writes, wrapped in one tar — `base.tar` (the data directory, with
//! `backup_label` and `tablespace_map`), `<oid>.tar` per tablespace,
//! `pg_wal.tar` (the WAL from the backup's start to its end, so the copy
//! reaches consistency alone) and the server's `backup_manifest`, which
//! PostgreSQL's `pg_verifybackup` checks after extraction. Optionally
//! zstd-compressed. Written as a stream: memory does not grow with the
//! backup's size. Reference: src/bin/pg_basebackup/pg_basebackup.c (tar
//! format), src/bin/pg_verifybackup.

use std::io::{self, Read, Write};

use strata_repo::{BackupManifest, BlockRef, FileEntry, FileKind, Repository};

use crate::restore::{plan_wal, StagedSegment};
use crate::{Engine, EngineError, EngineResult, GcGuard};

/// Reads a file's content block by block from the repository.
struct BlockReader<'a> {
    repo: &'a Repository,
    blocks: std::slice::Iter<'a, BlockRef>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for BlockReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            let Some(block) = self.blocks.next() else {
                return Ok(0);
            };
            self.current = self.repo.read_block(block).map_err(io::Error::other)?;
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counts bytes written (for sizes computed by a dry run).
#[derive(Default)]
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the content of a tar entry comes from (indexes into the
/// archive's manifest files and WAL plan).
enum Content {
    File(usize),
    Segment(usize),
}

enum Item<'a> {
    File(&'a FileEntry),
    Segment(&'a StagedSegment),
}

fn header(kind: FileKind, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(match kind {
        FileKind::File => tar::EntryType::Regular,
        FileKind::Dir => tar::EntryType::Directory,
        FileKind::Symlink => tar::EntryType::Symlink,
    });
    h.set_mode(mode & 0o7777);
    h.set_size(if kind == FileKind::File { size } else { 0 });
    h.set_mtime(mtime.max(0) as u64);
    h
}

/// What goes into one inner tar.
struct InnerTar {
    name: String,
    entries: Vec<(String, Content)>,
}

/// A backup set laid out for download.
pub struct BackupArchive {
    engine: Engine,
    /// Keeps garbage collection off the packs the archive reads for as long
    /// as it exists: a download drops it when the stream ends, fails or its
    /// client goes away.
    _reading: GcGuard,
    manifest: BackupManifest,
    wal: Vec<StagedSegment>,
    inner: Vec<InnerTar>,
    segment_size: u64,
}

impl Engine {
    /// Plans the archive of a backup set (reads the manifest and the WAL
    /// plan; nothing is streamed yet). Blocks while a garbage collection
    /// runs: call it off async worker threads.
    pub fn backup_archive(
        &self,
        instance_id: &str,
        backup_id: &str,
    ) -> EngineResult<BackupArchive> {
        let reading = self.hold_gc_blocking()?;
        let manifest = self.repo.read_manifest(instance_id, backup_id)?;
        let geometry = pg_wal::WalGeometry::new(manifest.wal_segment_size)
            .map_err(|e| EngineError::Failed(format!("backup {backup_id}: {e}")))?;
        let wal = self.catalog.list_wal_segments(instance_id)?;
        let histories = self.load_histories(instance_id)?;
        let last = geometry.segment_of(manifest.stop_lsn);
        let plan: Vec<StagedSegment> = plan_wal(&manifest, geometry, &wal, &histories)?
            .into_iter()
            .filter(|s| s.segno <= last)
            .collect();
        if plan
            .last()
            .is_none_or(|s| s.row.end_lsn < manifest.stop_lsn)
        {
            return Err(EngineError::Refused(format!(
                "the WAL backup {backup_id} needs to become consistent (up to {}) is no longer archived",
                manifest.stop_lsn
            )));
        }
        Ok(BackupArchive::new(self.clone(), reading, manifest, plan))
    }
}

impl BackupArchive {
    fn new(
        engine: Engine,
        reading: GcGuard,
        manifest: BackupManifest,
        wal: Vec<StagedSegment>,
    ) -> Self {
        let mut base = InnerTar {
            name: "base.tar".into(),
            entries: Vec::new(),
        };
        let mut spaces: Vec<InnerTar> = manifest
            .tablespaces
            .iter()
            .map(|t| InnerTar {
                name: format!("{}.tar", t.oid),
                entries: Vec::new(),
            })
            .collect();
        // Names were checked when the manifest was read (`read_manifest`
        // refuses absolute, `..` and other non-plain paths). Tablespace links
        // are left out: `tablespace_map` in base.tar tells PostgreSQL where
        // each tablespace goes, and a link's recorded target is not
        // something an archive should hand to whoever extracts it.
        for (i, f) in manifest
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind != FileKind::Symlink)
        {
            let target = match f.tablespace {
                None => Some(&mut base),
                Some(oid) => spaces.iter_mut().find(|s| s.name == format!("{oid}.tar")),
            };
            if let Some(t) = target {
                t.entries.push((f.path.clone(), Content::File(i)));
            }
        }
        let geometry = pg_wal::WalGeometry::new(manifest.wal_segment_size).ok();
        let pg_wal = InnerTar {
            name: "pg_wal.tar".into(),
            entries: wal
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let name = geometry
                        .map(|g| g.segment_file_name(s.row.timeline, s.segno))
                        .unwrap_or_else(|| s.row.segment.clone());
                    (name, Content::Segment(i))
                })
                .collect(),
        };
        let mut inner = vec![base];
        inner.append(&mut spaces);
        inner.push(pg_wal);
        let segment_size = manifest.wal_segment_size;
        BackupArchive {
            engine,
            _reading: reading,
            manifest,
            wal,
            inner,
            segment_size,
        }
    }

    /// Writes one inner tar; with `dry` file contents are zeros (same
    /// length), which gives the exact size without reading the repository.
    fn write_inner(&self, t: &InnerTar, out: &mut dyn Write, dry: bool) -> EngineResult<()> {
        let mut b = tar::Builder::new(out);
        b.mode(tar::HeaderMode::Complete);
        let io_err = |e: io::Error| EngineError::Io {
            context: format!("writing {}", t.name),
            source: e,
        };
        for (path, content) in &t.entries {
            let content = match content {
                Content::File(i) => Item::File(&self.manifest.files[*i]),
                Content::Segment(i) => Item::Segment(&self.wal[*i]),
            };
            match content {
                Item::File(f) if f.kind == FileKind::Dir => {
                    let mut h = header(f.kind, f.mode, 0, f.mtime);
                    b.append_data(&mut h, format!("{path}/"), io::empty())
                        .map_err(io_err)?;
                }
                Item::File(f) => {
                    let mut h = header(f.kind, f.mode, f.size, f.mtime);
                    if dry {
                        b.append_data(&mut h, path, io::repeat(0).take(f.size))
                            .map_err(io_err)?;
                    } else {
                        let reader = BlockReader {
                            repo: &self.engine.repo,
                            blocks: f.blocks.iter(),
                            current: Vec::new(),
                            pos: 0,
                        };
                        b.append_data(&mut h, path, reader).map_err(io_err)?;
                    }
                }
                Item::Segment(s) => {
                    let mut h = header(
                        FileKind::File,
                        0o600,
                        self.segment_size,
                        self.manifest.stop_time.timestamp(),
                    );
                    if dry {
                        b.append_data(&mut h, path, io::repeat(0).take(self.segment_size))
                            .map_err(io_err)?;
                    } else {
                        let (_, mut data) = self.engine.read_wal_row(&s.row)?;
                        data.resize(self.segment_size as usize, 0);
                        b.append_data(&mut h, path, &data[..]).map_err(io_err)?;
                    }
                }
            }
        }
        b.finish().map_err(io_err)?;
        Ok(())
    }

    fn inner_size(&self, t: &InnerTar) -> EngineResult<u64> {
        let mut c = Counter::default();
        self.write_inner(t, &mut c, true)?;
        Ok(c.0)
    }

    fn server_manifest(&self) -> EngineResult<Vec<u8>> {
        let f = self.manifest.server_manifest.as_ref().ok_or_else(|| {
            EngineError::Refused(format!(
                "backup {} has no server backup_manifest (taken by a server without manifests)",
                self.manifest.backup_id
            ))
        })?;
        let mut out = Vec::with_capacity(f.size as usize);
        BlockReader {
            repo: &self.engine.repo,
            blocks: f.blocks.iter(),
            current: Vec::new(),
            pos: 0,
        }
        .read_to_end(&mut out)
        .map_err(EngineError::io("reading backup_manifest"))?;
        Ok(out)
    }

    /// Size of the uncompressed archive, for `Content-Length`.
    pub fn size(&self) -> EngineResult<u64> {
        let pad = |n: u64| n.div_ceil(512) * 512;
        let mut total = 1024; // the end-of-archive blocks
        for t in &self.inner {
            total += 512 + pad(self.inner_size(t)?);
        }
        let manifest = self
            .manifest
            .server_manifest
            .as_ref()
            .map(|f| f.size)
            .unwrap_or(0);
        Ok(total + 512 + pad(manifest))
    }

    /// Streams the archive into `out`; with `zstd_level` it is compressed.
    pub fn write(&self, out: impl Write, zstd_level: Option<i32>) -> EngineResult<()> {
        match zstd_level {
            Some(level) => {
                let enc =
                    zstd::Encoder::new(out, level).map_err(EngineError::io("starting zstd"))?;
                let enc = self.write_outer(enc)?;
                enc.finish().map_err(EngineError::io("finishing zstd"))?;
                Ok(())
            }
            None => {
                self.write_outer(out)?;
                Ok(())
            }
        }
    }

    fn write_outer<W: Write>(&self, out: W) -> EngineResult<W> {
        let mut outer = tar::Builder::new(out);
        outer.mode(tar::HeaderMode::Complete);
        let mtime = self.manifest.stop_time.timestamp();
        let io_err = |e: io::Error| EngineError::Io {
            context: "writing the archive".into(),
            source: e,
        };
        for t in &self.inner {
            let size = self.inner_size(t)?;
            let mut h = header(FileKind::File, 0o600, size, mtime);
            h.set_path(&t.name).map_err(io_err)?;
            h.set_cksum();
            outer.append(&h, io::empty()).map_err(io_err)?;
            // The entry's content is the inner tar itself, written straight
            // through; its size is a multiple of 512, so no padding follows.
            let w = outer.get_mut();
            let mut counting = CountingWriter { inner: w, n: 0 };
            self.write_inner(t, &mut counting, false)?;
            if counting.n != size {
                return Err(EngineError::Failed(format!(
                    "{} came out {} bytes long instead of {size}",
                    t.name, counting.n
                )));
            }
        }
        let manifest = self.server_manifest()?;
        let mut h = header(FileKind::File, 0o600, manifest.len() as u64, mtime);
        outer
            .append_data(&mut h, "backup_manifest", &manifest[..])
            .map_err(io_err)?;
        outer.into_inner().map_err(io_err)
    }
}

struct CountingWriter<'w, W: Write> {
    inner: &'w mut W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
