//! The `strata` binary: parses configuration and the command line, wires the
//! catalog, repository and engine together, and prints results.

mod config;
mod keys;
mod log;
mod output;
mod serve;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use pg_wal::Lsn;
use strata_catalog::{BackupMode, Instance, LeaseKeeper, SqliteCatalog, SslMode};
use strata_engine::{
    BackupOptions, Engine, RecoveryTarget, RestoreOptions, StartOptions, WalReceiveOptions,
};
use strata_repo::Repository;

use config::Config;
use output::{human_bytes, CliProgress};

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
    /// Restore an instance into a new data directory.
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
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create a key pair and print it (the secret is shown only here).
    Create {
        /// The key may call only Describe* actions.
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
    },
    /// List registered servers.
    List {
        #[arg(long)]
        json: bool,
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
    },
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
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").args(["time", "lsn", "xid", "name", "immediate"])))]
struct RestoreArgs {
    id: String,
    /// New data directory (must be empty or absent).
    #[arg(long)]
    target_dir: PathBuf,
    /// Backup set to restore (default: the newest one before the target).
    #[arg(long)]
    backup: Option<String>,
    /// Recover to this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
    #[arg(long)]
    time: Option<String>,
    /// Recover to this WAL position (e.g. 0/3000000).
    #[arg(long)]
    lsn: Option<String>,
    /// Recover up to and including this transaction.
    #[arg(long)]
    xid: Option<u32>,
    /// Recover to this named restore point.
    #[arg(long)]
    name: Option<String>,
    /// Stop as soon as the backup is consistent (no WAL replayed past it).
    #[arg(long)]
    immediate: bool,
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

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(log::StderrOneLine)
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

fn open_engine(config: &Config) -> Result<Engine> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let catalog_path = config.catalog_path();
    if let Some(parent) = catalog_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let catalog = SqliteCatalog::open(&catalog_path)
        .with_context(|| format!("cannot open catalog {}", catalog_path.display()))?;
    // The catalog holds API secrets and instance passwords.
    for suffix in ["", "-wal", "-shm"] {
        let mut p = catalog_path.clone().into_os_string();
        p.push(suffix);
        keys::make_private(std::path::Path::new(&p))?;
    }
    let key = config.key_source()?;
    let mut repo = Repository::open_or_init_with_key(config.storage()?, key.as_ref())?;
    if let Some(level) = config.compress_level {
        repo = repo.with_compress_level(level);
    }
    Ok(Engine::new(
        Arc::new(catalog),
        repo,
        config.engine_settings(),
    ))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    let engine = open_engine(&config)?;
    // Every job this process creates (a backup or restore run here, or
    // everything `serve` runs) stays owned by it while the lease is renewed.
    let _lease = LeaseKeeper::start(engine.catalog().clone(), engine.lease_renewal_interval())
        .context("cannot start the job lease renewal thread")?;
    match cli.command {
        Command::Instance(InstanceCmd::Add {
            id,
            host,
            port,
            user,
            password_env,
            dbname,
            sslmode,
            sslrootcert,
            no_check,
        }) => {
            if !Instance::valid_id(&id) {
                bail!("instance id {id:?} may only use letters, digits, '-', '_' and '.' (at most 64)");
            }
            // Parsed here rather than by clap: one `error:` line, like every other refusal.
            let sslmode: SslMode = sslmode.parse()?;
            let mut instance = Instance {
                password_env,
                dbname,
                sslrootcert: sslrootcert.map(|p| p.display().to_string()),
                ..Instance::new(&id, &host, port, &user, sslmode)
            };
            if let Ok(existing) = engine.catalog().get_instance(&id) {
                bail!(
                    "instance {:?} already exists ({}:{})",
                    id,
                    existing.host,
                    existing.port
                );
            }
            if !no_check {
                let facts = runtime()?.block_on(engine.probe(&instance))?;
                instance.system_identifier = Some(facts.system_id);
                instance.pg_version_num = Some(facts.pg_version_num);
                instance.wal_segment_size = Some(facts.wal_segment_size);
            }
            engine.add_instance(&instance)?;
            for warning in strata_engine::connection_warnings(&instance) {
                eprintln!("warning: instance {id}: {warning}");
            }
            println!("instance {id} added");
        }
        Command::Instance(InstanceCmd::List { json }) => {
            let list = engine.catalog().list_instances()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                output::print_instances(&list);
            }
        }
        Command::Backup(BackupCmd::Create { id, max_rate }) => {
            let opts = BackupOptions {
                mode: BackupMode::Manual,
                max_rate_kb: max_rate,
            };
            let progress = CliProgress::new();
            let started = std::time::Instant::now();
            let set = runtime()?.block_on(engine.backup(&id, &opts, &progress))?;
            progress.finish();
            println!(
                "backup {} of {}: {} in {} files; {} new ({} stored), {} deduplicated; {:.1}s",
                set.id,
                set.instance_id,
                human_bytes(set.total_bytes),
                set.file_count,
                human_bytes(set.new_bytes),
                human_bytes(set.stored_bytes),
                human_bytes(set.dedup_bytes),
                started.elapsed().as_secs_f64()
            );

            println!("{}", set.id);
        }
        Command::Backup(BackupCmd::List { id, json }) => {
            engine.catalog().get_instance(&id)?;
            engine.fail_expired_jobs()?;
            let list = engine.catalog().list_backups(&id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                output::print_backups(&list);
            }
        }
        Command::Backup(BackupCmd::Show { id, backup, json }) => {
            engine.catalog().get_instance(&id)?;
            let m = engine.repo().read_manifest(&id, &backup)?;
            let summary = output::BackupSummary::of(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                summary.print();
            }
        }
        Command::Wal(WalCmd::Receive { id, no_reconnect }) => {
            engine.catalog().get_instance(&id)?;
            let rt = runtime()?;
            rt.block_on(async {
                let (tx, rx) = tokio::sync::watch::channel(false);
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    let _ = tx.send(true);
                });
                let progress = CliProgress::lines();
                engine
                    .receive_wal(&id, rx, WalReceiveOptions { no_reconnect }, &progress)
                    .await?;
                eprintln!("WAL receiver for {id} stopped");
                anyhow::Ok(())
            })?;
        }
        Command::Wal(WalCmd::List { id, json }) => {
            engine.catalog().get_instance(&id)?;
            let list = engine.catalog().list_wal_segments(&id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                output::print_wal(&list);
            }
        }
        Command::Restore(args) => {
            let target =
                if let Some(t) = &args.time {
                    RecoveryTarget::Time(parse_time(t)?)
                } else if let Some(l) = &args.lsn {
                    RecoveryTarget::Lsn(l.parse::<Lsn>().map_err(|_| {
                        anyhow::anyhow!("invalid LSN {l:?} (expected e.g. 0/3000000)")
                    })?)
                } else if let Some(x) = args.xid {
                    RecoveryTarget::Xid(x)
                } else if let Some(n) = &args.name {
                    RecoveryTarget::Name(n.clone())
                } else if args.immediate {
                    RecoveryTarget::Immediate
                } else {
                    RecoveryTarget::Latest
                };
            let opts = RestoreOptions {
                target_dir: args.target_dir.clone(),
                backup_id: args.backup.clone(),
                target,
                start: if args.start {
                    args.port.map(|port| StartOptions {
                        port,
                        ..Default::default()
                    })
                } else {
                    None
                },
                job_id: None,
                index: None,
            };
            let progress = CliProgress::new();
            let outcome = engine.restore(&args.id, &opts, &progress)?;
            progress.finish();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                println!(
                    "restored backup {} to {}: {} in {} files, {} WAL segments (to {}), recovering to {}",
                    outcome.backup_id,
                    outcome.target_dir.display(),
                    human_bytes(outcome.bytes),
                    outcome.files,
                    outcome.wal_segments,
                    outcome.wal_end,
                    outcome.target
                );
                match outcome.started_port {
                    Some(port) => println!(
                        "server running on port {port}{}",
                        outcome
                            .recovery_stop
                            .map(|s| format!(" ({})", s.trim()))
                            .unwrap_or_default()
                    ),
                    None => println!(
                        "start it with: pg_ctl -D {} start (recovery runs on start)",
                        outcome.target_dir.display()
                    ),
                }
            }
        }
        Command::Task(TaskCmd::List { id, json }) => {
            engine.fail_expired_jobs()?;
            let jobs = engine.catalog().list_jobs(id.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                output::print_jobs(&jobs);
            }
        }
        Command::Repo(RepoCmd::Verify { json }) => {
            let progress = CliProgress::objects();
            let report = engine.repo().verify(&|done, total| {
                strata_engine::Progress::update(&progress, "verify", done, Some(total))
            })?;
            progress.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                output::print_verify(&report);
            }
            if !report.is_clean() {
                bail!(
                    "repository verification found {} problem(s)",
                    report.problems.len()
                );
            }
        }
        Command::Repo(RepoCmd::Usage { json, region }) => {
            let repo = match region {
                Some(id) => config.regions()?.target(&id)?.repository()?,
                None => engine.repo().clone(),
            };
            let usage = repo.measure_usage(&mut Default::default())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&usage)?);
            } else {
                output::print_usage(&usage);
            }
        }
        Command::Serve { listen, demo } => {
            serve::serve(&config, engine, listen, demo)?;
        }
        Command::Key(KeyCmd::Create {
            read_only,
            description,
            json,
        }) => {
            let key = keys::generate(read_only, &description);
            engine.catalog().add_access_key(&key)?;
            if json {
                println!("{}", keys::pair_json(&key));
            } else {
                println!("AccessKeyId:     {}", key.id);
                println!("AccessKeySecret: {}", key.secret);
                println!(
                    "({}; the secret is not shown again)",
                    if read_only {
                        "read-only: Describe* actions only"
                    } else {
                        "full access"
                    }
                );
            }
        }
        Command::Key(KeyCmd::List { json }) => {
            let list = engine.catalog().list_access_keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<26} {:<10} {:<20} DESCRIPTION",
                    "ACCESS KEY ID", "ACCESS", "CREATED"
                );
                for k in list {
                    println!(
                        "{:<26} {:<10} {:<20} {}",
                        k.id,
                        if k.read_only { "read-only" } else { "full" },
                        k.created_at.format("%Y-%m-%d %H:%M:%S"),
                        k.description
                    );
                }
            }
        }
        Command::Key(KeyCmd::Delete { id }) => {
            if !engine.catalog().delete_access_key(&id)? {
                bail!("no AccessKey {id:?}");
            }
            println!("deleted AccessKey {id}");
        }
        Command::Repo(RepoCmd::RotateKey {
            new_key_file,
            new_passphrase_env,
        }) => {
            let new = match (new_key_file, new_passphrase_env) {
                (Some(path), _) => strata_repo::KeySource::KeyFile(path),
                (None, Some(var)) => config::passphrase_from_env(&var)?,
                (None, None) => bail!("give --new-key-file or --new-passphrase-env"),
            };
            let mut repo = engine.repo().clone();
            repo.rotate_key(&new)?;
            println!(
                "repository {} is now unlocked by the new {}; update [encryption] in the configuration",
                repo.config().repository_id,
                if matches!(new, strata_repo::KeySource::KeyFile(_)) {
                    "key file"
                } else {
                    "passphrase"
                }
            );
        }
        Command::Repo(RepoCmd::Reindex) => {
            let report = engine.reindex()?;
            println!(
                "reindexed {} instance(s) ({} added), {} backup set(s), {} WAL object(s)",
                report.instances, report.instances_added, report.backups, report.wal_segments
            );
        }
    }
    Ok(())
}

fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // RDS spells times without seconds: 2026-11-25T10:00Z.
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%MZ") {
        return Ok(t.and_utc());
    }
    bail!("invalid time {s:?} (expected RFC 3339, e.g. 2026-11-25T10:00:00Z)")
}
