//! A restore from a repository an attacker could write. In a plain
//! (unencrypted) repository the manifest's seal is a keyed hash whose key
//! sits in `strata-repo.json` beside it, so anyone who can write the
//! repository can forge a manifest. These tests forge one the way such an
//! attacker would (the repository crate's public sealing function and the
//! key read from `strata-repo.json`) with entries that try to write outside
//! the restore's target, and check against the real binary that the restore
//! is refused, names the entry, and leaves nothing outside its target.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::Strata;
use strata_repo::object::seal;
use strata_repo::{
    manifest_key, BackupManifest, FileEntry, FileKind, Keys, LocalStorage, ObjectKind, Repository,
    TablespaceEntry,
};

/// Re-seals `manifest` over the original, with the key an attacker reads
/// from `strata-repo.json`.
fn forge(repo_dir: &Path, manifest: &BackupManifest) {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_dir.join("strata-repo.json")).unwrap()).unwrap();
    let mut key = [0u8; 32];
    hex_decode(config["hash_key"].as_str().unwrap(), &mut key);
    let bytes = seal(
        &Keys::plain(key),
        ObjectKind::Manifest,
        &serde_json::json!({"backup_id": manifest.backup_id}),
        &serde_json::to_vec(manifest).unwrap(),
        Some(3),
    )
    .unwrap();
    std::fs::write(
        repo_dir.join(manifest_key(&manifest.instance_id, &manifest.backup_id)),
        bytes,
    )
    .unwrap();
}

fn hex_decode(text: &str, out: &mut [u8; 32]) {
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
    }
}

/// A copy of the backup's `PG_VERSION` entry (real blocks, real content)
/// under another name and kind.
fn entry(template: &FileEntry, path: &str, kind: FileKind, link: Option<&str>) -> FileEntry {
    let mut f = template.clone();
    f.path = path.to_string();
    f.kind = kind;
    f.link_target = link.map(str::to_string);
    if kind != FileKind::File {
        f.size = 0;
        f.crc32c = None;
        f.blocks.clear();
    }
    f
}

/// Everything a forged entry could have created outside the target.
fn escapes(outside: &Path, target: &Path, unique: &str) -> Vec<PathBuf> {
    let above = target.parent().unwrap().parent().unwrap().join(unique);
    [
        outside.join("pwned"),
        outside.join("x"),
        above.clone(),
        above.join("x"),
    ]
    .into_iter()
    .filter(|p| p.symlink_metadata().is_ok())
    .collect()
}

#[test]
fn restore_refuses_a_forged_manifest_and_writes_nothing_outside_its_target() {
    let pg = testkit::shared_cluster(15);
    let strata = Strata::new("hostile");
    strata.add_instance("hostile", pg);
    let backup_id = strata.backup("hostile");
    let repo_dir = strata.repo_dir();
    let repo = Repository::open(Arc::new(LocalStorage::new(&repo_dir).unwrap())).unwrap();
    let original = repo.read_manifest("hostile", &backup_id).unwrap();
    let pg_version = original
        .files
        .iter()
        .find(|f| f.path == "PG_VERSION")
        .unwrap()
        .clone();

    // The directory the forged links point at exists, so an old restore's
    // writes through them would land.
    let unique = format!(
        "strata-hostile-{}-{}",
        std::process::id(),
        backup_id.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    let outside = std::env::temp_dir().join(&unique);
    std::fs::create_dir_all(&outside).unwrap();
    let outside_s = outside.display().to_string();
    let absolute = format!("{outside_s}/pwned");
    let parent = format!("../../{unique}");

    struct Case {
        name: &'static str,
        entries: Vec<FileEntry>,
        extra_tablespace: bool,
        /// The entry the refusal must name.
        named: String,
    }
    let cases = vec![
        Case {
            name: "absolute",
            entries: vec![entry(&pg_version, &absolute, FileKind::File, None)],
            extra_tablespace: false,
            named: absolute.clone(),
        },
        Case {
            name: "parent",
            entries: vec![entry(&pg_version, &parent, FileKind::File, None)],
            extra_tablespace: false,
            named: parent.clone(),
        },
        Case {
            name: "unlisted tablespace link",
            entries: vec![
                entry(
                    &pg_version,
                    "pg_tblspc/9999",
                    FileKind::Symlink,
                    Some(&outside_s),
                ),
                entry(&pg_version, "pg_tblspc/9999/x", FileKind::File, None),
            ],
            extra_tablespace: false,
            named: "pg_tblspc/9999".into(),
        },
        Case {
            name: "listed tablespace link",
            entries: vec![
                entry(
                    &pg_version,
                    "pg_tblspc/9999",
                    FileKind::Symlink,
                    Some(&outside_s),
                ),
                entry(&pg_version, "pg_tblspc/9999/x", FileKind::File, None),
            ],
            extra_tablespace: true,
            named: "pg_tblspc/9999/x".into(),
        },
        Case {
            name: "link outside pg_tblspc",
            entries: vec![
                entry(
                    &pg_version,
                    "base/evil",
                    FileKind::Symlink,
                    Some(&outside_s),
                ),
                entry(&pg_version, "base/evil/x", FileKind::File, None),
            ],
            extra_tablespace: false,
            named: "base/evil".into(),
        },
    ];

    for case in cases {
        let mut forged = original.clone();
        forged.files.extend(case.entries);
        if case.extra_tablespace {
            forged.tablespaces.push(TablespaceEntry {
                oid: 9999,
                location: outside_s.clone(),
            });
        }
        forge(&repo_dir, &forged);

        let target = strata.dir.join("restores").join("target");
        let err = strata.fails(&[
            "restore",
            "hostile",
            "--target-dir",
            &target.display().to_string(),
        ]);
        assert!(
            err.contains(&format!("{:?}", case.named)) && err.contains("refused"),
            "{}: the refusal should name {:?}: {err}",
            case.name,
            case.named
        );
        assert_eq!(
            escapes(&outside, &target, &unique),
            Vec::<PathBuf>::new(),
            "{}: written outside the target",
            case.name
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "{}: {outside_s} is no longer empty",
            case.name
        );
        // Refused before anything was written.
        assert!(
            !target.join("PG_VERSION").exists(),
            "{}: files were restored",
            case.name
        );

        // Every other reader of the manifest refuses it too.
        let shown = strata.fails(&["backup", "show", "hostile", &backup_id]);
        assert!(shown.contains(&format!("{:?}", case.named)), "{shown}");
    }

    // The untouched manifest still restores (the checks refuse only forgeries).
    forge(&repo_dir, &original);
    let target = strata.dir.join("restores").join("good");
    strata.ok(&[
        "restore",
        "hostile",
        "--target-dir",
        &target.display().to_string(),
    ]);
    assert_eq!(
        std::fs::read(target.join("PG_VERSION")).unwrap(),
        b"15\n".to_vec()
    );

    // A delta restore gathers pg_control in memory: a forged manifest listing its block
    // again and again is refused at 64 KiB, one listing it twice by its size and checksum.
    let control_before = std::fs::read(target.join("global/pg_control")).unwrap();
    for (copies, says) in [
        (10, "is over 65536 bytes"),
        (2, "does not have the size and checksum"),
    ] {
        let mut forged = original.clone();
        let control = forged
            .files
            .iter_mut()
            .find(|f| f.path == "global/pg_control")
            .unwrap();
        control.blocks = std::iter::repeat_n(control.blocks.clone(), copies)
            .flatten()
            .collect();
        forge(&repo_dir, &forged);
        let err = strata.fails(&[
            "restore",
            "hostile",
            "--target-dir",
            &target.display().to_string(),
            "--delta",
        ]);
        assert!(err.contains(says), "{copies} copies: {err}");
        // As any failed delta restore, it leaves a directory PostgreSQL will not start.
        assert!(!target.join("global/pg_control").exists());
    }
    // The untouched manifest completes it.
    forge(&repo_dir, &original);
    strata.ok(&[
        "restore",
        "hostile",
        "--target-dir",
        &target.display().to_string(),
        "--delta",
    ]);
    assert_eq!(
        std::fs::read(target.join("global/pg_control")).unwrap(),
        control_before
    );
    std::fs::remove_dir_all(&outside).unwrap();
}
