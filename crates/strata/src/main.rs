//! The `strata` binary: parses configuration and the command line, wires the
//! catalog, repository and engine together, and prints results.

mod agent;
mod commands;
mod config;
mod keys;
mod log;
mod output;
mod serve;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use strata_catalog::{Catalog, LeaseKeeper, PgCatalog, SqliteCatalog};
use strata_engine::Engine;
use strata_repo::Repository;

use config::{CatalogLocation, Config};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Backup and point-in-time recovery for PostgreSQL"
)]
struct Cli {
    /// Configuration file (default: ./strata.toml if present, else embedded defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register and list PostgreSQL servers.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Take and list full backups.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Archive and list WAL.
    #[command(subcommand)]
    Wal(WalCmd),
    /// Bring backups taken elsewhere into the repository.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Restore an instance into a new data directory (or, with --delta,
    /// over an existing one of the same cluster).
    Restore(RestoreArgs),
    /// Jobs and their states.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Work on the repository itself.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Run the service: RDS-compatible API, scheduler, WAL archiving, retention.
    Serve {
        /// Address to listen on (default: server.listen from the configuration, else 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
        /// Also start a sandbox PostgreSQL with sample data and archive it.
        #[arg(long)]
        demo: bool,
    },
    /// Manage API AccessKey pairs.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Work on the catalog itself.
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// Run the snapshot agent on the database host: copy-on-write snapshots and clones of
    /// one data directory, served over signed HTTP.
    Agent(agent::AgentArgs),
    /// Notifications: check the configured sinks.
    #[command(subcommand)]
    Notify(NotifyCmd),
}

#[derive(Subcommand)]
enum NotifyCmd {
    /// Send a test event to every sink (or one) and report each result;
    /// fails when any delivery fails.
    Test {
        /// Only this sink.
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Copy the configured SQLite catalog into an empty PostgreSQL catalog
    /// (one transaction, checked row for row), then set `catalog` to the URL.
    /// Stop every Strata process using the SQLite catalog first.
    Migrate {
        /// The PostgreSQL catalog: postgres://user@host:port/dbname?sslmode=…
        /// (password from `catalog_password_env` or the URL).
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create a key pair and print it (the secret is shown only here).
    Create {
        /// The key may call only Describe*, List* and Check* actions.
        #[arg(long)]
        read_only: bool,
        #[arg(long, default_value = "")]
        description: String,
        /// Print exactly {"AccessKeyId": "...", "AccessKeySecret": "..."}.
        #[arg(long)]
        json: bool,
    },
    /// List key ids (never secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a key; requests signed with it are refused from then on.
    Delete { id: String },
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum InstanceCmd {
    /// Register a server. Connects first to check it can be backed up.
    Add {
        id: String,
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 5432)]
        port: u16,
        #[arg(long)]
        user: String,
        /// Environment variable holding the password (the password itself is never stored).
        #[arg(long)]
        password_env: Option<String>,
        #[arg(long)]
        dbname: Option<String>,
        /// libpq sslmode: disable, allow, prefer, require, verify-ca, verify-full.
        #[arg(long, default_value = "prefer")]
        sslmode: String,
        /// CA certificate for verify-ca / verify-full.
        #[arg(long)]
        sslrootcert: Option<PathBuf>,
        /// Register without connecting.
        #[arg(long)]
        no_check: bool,
        /// URL of `strata agent` on the database host (snapshot backups,
        /// instant clones), e.g. https://db1:7432.
        #[arg(long)]
        agent: Option<String>,
        /// The agent's key file (written by the agent on its first start).
        #[arg(long, requires = "agent")]
        agent_key_file: Option<PathBuf>,
        /// Certificate or CA file to trust for an https agent URL.
        #[arg(long, requires = "agent")]
        agent_ca: Option<PathBuf>,
    },
    /// List registered servers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Change how Strata logs in to a registered server: the password's
    /// variable, the TLS mode.
    Modify {
        id: String,
        /// Environment variable holding the password from now on.
        #[arg(long)]
        password_env: Option<String>,
        /// Read no environment variable (the password stored with the
        /// instance, if any, or none).
        #[arg(long, conflicts_with = "password_env")]
        no_password_env: bool,
        /// libpq sslmode from now on: disable, allow, prefer, require, verify-ca, verify-full.
        #[arg(long)]
        sslmode: Option<String>,
        /// CA certificate for verify-ca / verify-full (with --sslmode).
        #[arg(long, requires = "sslmode")]
        sslrootcert: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Run a full backup now; the last line printed is the backup set id.
    Create {
        id: String,
        /// Limit the server's read rate, in kB/s (32 to 1048576).
        #[arg(long)]
        max_rate: Option<u32>,
        /// A snapshot of the data directory through the instance's agent
        /// (seconds, whatever the size) instead of a copy over the
        /// replication protocol.
        #[arg(long)]
        snapshot: bool,
    },
    /// Upload a snapshot backup set from the instance's agent into the
    /// repository now (what the server does in the background after each
    /// snapshot): reads only what changed since the previous uploaded snapshot.
    Upload { id: String, backup: String },
    /// List backup sets of an instance.
    List {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show what the repository holds for one backup set: positions, files,
    /// bytes, and what the server sent for it.
    Show {
        id: String,
        backup: String,
        #[arg(long)]
        json: bool,
    },
    /// Keep a backup set past its retention, forever or until a date:
    /// neither retention, a deletion nor garbage collection removes it until
    /// it is released.
    Keep {
        id: String,
        backup: String,
        /// Keep until this date (`YYYY-MM-DD`, midnight UTC) or time (RFC
        /// 3339) instead of forever.
        #[arg(long)]
        until: Option<String>,
        /// Why the set is kept (shown in lists).
        #[arg(long)]
        note: Option<String>,
    },
    /// Release a set kept by hand: retention decides its fate again.
    Release { id: String, backup: String },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// Import the output directory of `pg_basebackup -Ft` (base.tar,
    /// <oid>.tar, pg_wal.tar, each plain, .gz or .zst, and backup_manifest)
    /// as a backup set of a registered instance; the last line printed is
    /// the backup set id.
    Basebackup {
        /// The instance the backup was taken of.
        #[arg(long)]
        instance: String,
        /// The directory pg_basebackup wrote.
        dir: PathBuf,
    },
    /// Import every backup of a pgBackRest stanza (full, differential,
    /// incremental; gz, zst or uncompressed) with its archived WAL, oldest
    /// first, each as a backup set; the last lines printed are the backup
    /// set ids.
    Pgbackrest {
        /// The instance the stanza backs up.
        #[arg(long)]
        instance: String,
        /// The pgBackRest repository (repo1-path).
        #[arg(long)]
        repo: PathBuf,
        /// The stanza.
        #[arg(long)]
        stanza: String,
    },
}

#[derive(Subcommand)]
enum WalCmd {
    /// Stream WAL into the repository until SIGINT or SIGTERM.
    Receive {
        id: String,
        /// Exit on connection loss instead of reconnecting.
        #[arg(long)]
        no_reconnect: bool,
    },
    /// List archived WAL segments.
    List {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List recovery events: tables dropped or truncated, databases
    /// dropped, large deletes and updates, restore points; each with the
    /// restore targets just before and just after it.
    Events {
        id: String,
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only events at or before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Only events of this table (`name` or `schema.name`).
        #[arg(long)]
        table: Option<String>,
        /// Only events of this database.
        #[arg(long)]
        database: Option<String>,
        /// Only these kinds (DropTable, Truncate, DropDatabase, Delete,
        /// Update, RestorePoint), comma-separated.
        #[arg(long, value_delimiter = ',')]
        kind: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").args(["time", "lsn", "xid", "name", "immediate"])))]
#[command(group(clap::ArgGroup::new("exact").args(["lsn", "xid"])))]
struct RestoreArgs {
    id: String,
    /// New data directory (must be empty or absent; with --delta, an
    /// existing data directory of the same cluster).
    #[arg(long)]
    target_dir: PathBuf,
    /// Restore over the data directory already in --target-dir: only the
    /// blocks that differ from the backup are written, what the backup does
    /// not have is removed. No server may run in it.
    #[arg(long)]
    delta: bool,
    /// Backup set to restore (default: the newest one before the target).
    #[arg(long)]
    backup: Option<String>,
    /// Recover to this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
    #[arg(long)]
    time: Option<String>,
    /// Recover to this WAL position (e.g. 0/3000000): up to and including
    /// the first record there (with --exclusive, up to just before it).
    #[arg(long)]
    lsn: Option<String>,
    /// Recover up to and including this transaction's commit (with
    /// --exclusive, up to just before it: the transaction undone).
    #[arg(long)]
    xid: Option<u32>,
    /// Stop just before the --xid transaction or the --lsn position
    /// instead of just after it (recovery_target_inclusive = off).
    #[arg(long, requires = "exact")]
    exclusive: bool,
    /// Recover to this named restore point.
    #[arg(long)]
    name: Option<String>,
    /// Stop as soon as the backup is consistent (no WAL replayed past it).
    #[arg(long)]
    immediate: bool,
    /// Read the repository as it was at this time (RFC 3339), from the
    /// object versions of its S3 bucket, read-only: what was deleted or
    /// overwritten in the repository since is restored from all the same.
    #[arg(long, value_name = "TIME")]
    repo_as_of: Option<String>,
    /// Start the restored server and wait until the target is reached.
    #[arg(long, requires = "port")]
    start: bool,
    /// Port for the started server.
    #[arg(long)]
    port: Option<u16>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TaskCmd {
    /// List jobs (optionally of one instance).
    List {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RepoCmd {
    /// Re-read every object and check every hash.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the catalog's index from the repository.
    Reindex,
    /// Apply every instance's retention now, or with `--dry-run` show what
    /// it would delete and why each set stays.
    Retention {
        /// Show the decision, delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
        /// Decide as of this date or time instead of now (dry run only):
        /// what will have gone by then, if no new set is taken.
        #[arg(long, requires = "dry_run")]
        at: Option<String>,
    },
    /// Collect garbage once now: delete packs no backup set references
    /// once they stayed so for `[gc] grace_secs`. Does nothing (and says
    /// so) while a backup or a reader on any node holds the repository.
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Bytes the repository stores for each instance (data, WAL) and for
    /// nobody, by the attribution rule of docs/DESIGN.md.
    Usage {
        #[arg(long)]
        json: bool,
        /// Measure the cross-region target `[regions.<id>]` instead (opened
        /// as the copier opens it: created when empty).
        #[arg(long)]
        region: Option<String>,
    },
    /// Benchmarks only: store earlier backup sets and a large block index
    /// without taking backups (docs/BENCHMARKS.md, "Block index").
    #[command(hide = true)]
    BenchFill {
        /// Instance with at least one backup set.
        instance: String,
        /// Copies of the newest set, stored as older sets (earlier backups
        /// of an unchanged database).
        #[arg(long, default_value_t = 0)]
        copies: u64,
        /// Distinct synthetic blocks: random hashes in empty packs, listed
        /// by `--manifests` synthetic sets and by one index run covering them.
        #[arg(long, default_value_t = 0)]
        blocks: u64,
        #[arg(long, default_value_t = 64)]
        manifests: u64,
        #[arg(long, default_value_t = 128)]
        blocks_per_pack: u64,
    },
    /// Re-wrap an encrypted repository's data key under a new key file or
    /// passphrase (no data is rewritten). Update the encryption settings afterwards.
    #[command(group(clap::ArgGroup::new("new_key").required(true).args(["new_key_file", "new_passphrase_env"])))]
    RotateKey {
        /// File holding the new master key (at least 32 bytes).
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        /// Environment variable holding the new passphrase.
        #[arg(long)]
        new_passphrase_env: Option<String>,
    },
}

/// Keeps glibc from holding freed segment-sized buffers. By default glibc
/// raises its mmap threshold each time a large mmapped block is freed, so
/// after the first WAL segment completes, later 16 MiB buffers come from
/// the heap arenas of whichever blocking thread stored them, and freed
/// arena memory mostly stays resident. A fixed threshold keeps every buffer
/// over 1 MiB mmapped, returned to the system when freed.
///
/// Fixing it also fixes the trim threshold at its default of 128 KiB: an
/// arena then hands its free top back to the system (and faults it in
/// again) about every time a 128 KiB block of a backup is freed, which cost
/// a third of a backup's system time. Arenas keep up to 16 MiB free instead
/// (what a backup's threads held is handed back when the backup ends, see
/// `strata_engine::return_free_memory`); everything larger than 1 MiB is
/// still returned at once. This overrides `MALLOC_TRIM_THRESHOLD_`.
fn bound_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

fn main() {
    bound_allocator_retention();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(log::StderrOneLine)
        // Colours only for a person at a terminal, not in the journal or a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(": ");
                msg.push_str(&c);
            }
        }
        // One line, always: scripts read the last stderr line.
        eprintln!("error: {}", msg.replace('\n', "; "));
        std::process::exit(1);
    }
}

/// `--repo-as-of`: a time as `--time` takes it, not in the future (a view
/// of the repository's future would change under the restore).
fn repo_as_of(text: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    let time = commands::parse_time(text).context("--repo-as-of")?;
    if time > chrono::Utc::now() {
        anyhow::bail!("--repo-as-of {text} is in the future");
    }
    Ok(time)
}

fn open_engine(config: &Config) -> Result<Engine> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let catalog: Arc<dyn Catalog> = match config.catalog_location()? {
        CatalogLocation::Sqlite(path) => Arc::new(open_sqlite(&path)?),
        CatalogLocation::Postgres(connect) => Arc::new(
            PgCatalog::open(&connect)
                .with_context(|| format!("cannot open catalog {}", connect.redacted()))?,
        ),
    };
    let key = config.key_source()?;
    let mut repo = Repository::open_or_init_with_key(config.storage()?, key.as_ref())?
        .with_index_cache(data_dir.join("index-cache"));
    if let Some(level) = config.compress_level {
        repo = repo.with_compress_level(level);
    }
    let engine = Engine::new(catalog, repo, config.engine_settings());
    Ok(match config.kms.client()? {
        Some(kms) => engine.with_kms(kms),
        None => engine,
    })
}

/// Opens (creating) the SQLite catalog at `path`, readable by its owner only.
fn open_sqlite(path: &std::path::Path) -> Result<SqliteCatalog> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let catalog = SqliteCatalog::open(path)
        .with_context(|| format!("cannot open catalog {}", path.display()))?;
    // The catalog holds API secrets and instance passwords.
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.to_path_buf().into_os_string();
        p.push(suffix);
        keys::make_private(std::path::Path::new(&p))?;
    }
    Ok(catalog)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs a job that reads a socket to its end on one of the runtime's
/// worker threads. The workers poll the socket driver themselves, so a
/// task on one is woken where the readiness arrives; driven from this
/// thread by `block_on`, every read would first wake a worker and then
/// this thread, two context switches per read.
fn on_worker<T: Send + 'static>(
    job: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    runtime()?.block_on(async move {
        match tokio::spawn(job).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!("the job was cancelled: {e}")),
        }
    })
}

fn run(cli: Cli) -> Result<()> {
    // The agent runs on the database host: no catalog, repository or configuration.
    if let Command::Agent(args) = cli.command {
        return agent::run(args);
    }
    let mut config = Config::load(cli.config.as_deref())?;
    if let Command::Restore(RestoreArgs {
        repo_as_of: Some(time),
        ..
    }) = &cli.command
    {
        config.repo_as_of = Some(repo_as_of(time)?);
    }
    // A test notification needs only the configured sinks.
    if let Command::Notify(NotifyCmd::Test { sink, json }) = &cli.command {
        let notifier = config.notify.notifier()?;
        let sink = sink.clone();
        let json = *json;
        return on_worker(
            async move { commands::notify_test(&notifier, sink.as_deref(), json).await },
        );
    }
    // Moving the catalog needs neither the repository nor a lease.
    if let Command::Catalog(CatalogCmd::Migrate { to, json }) = &cli.command {
        return commands::catalog_migrate(&config, to, *json);
    }
    let engine = open_engine(&config)?;
    // Every job this process creates (a backup or restore run here, or
    // everything `serve` runs) stays owned by it while the lease is renewed.
    let _lease = LeaseKeeper::start(engine.catalog().clone(), engine.lease_renewal_interval())
        .context("cannot start the job lease renewal thread")?;
    match cli.command {
        Command::Instance(cmd) => commands::instance(&engine, cmd),
        Command::Backup(cmd) => commands::backup(&engine, cmd),
        Command::Wal(cmd) => commands::wal(&engine, cmd),
        Command::Import(cmd) => commands::import(&engine, cmd),
        Command::Restore(args) => commands::restore(&engine, &args),
        Command::Task(TaskCmd::List { id, json }) => commands::tasks(&engine, id.as_deref(), json),
        Command::Repo(cmd) => commands::repo(&config, &engine, cmd),
        Command::Key(cmd) => commands::key(&engine, cmd),
        Command::Serve { listen, demo } => serve::serve(&config, engine, listen, demo),
        Command::Catalog(CatalogCmd::Migrate { to, json }) => {
            commands::catalog_migrate(&config, &to, json)
        }
        Command::Agent(_) | Command::Notify(_) => {
            unreachable!("handled before the engine is opened")
        }
    }
}
