//! One function per command group of the CLI: each turns parsed arguments
//! into engine calls and prints the result, as a table or as JSON.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use pg_wal::Lsn;
use serde::Serialize;
use strata_catalog::{BackupMethod, BackupMode, BackupPolicy, Instance, KeepUntil, SslMode};
use strata_engine::{
    BackupOptions, Engine, EventFilter, RecoveryTarget, RestoreOptions, RestoreOutcome,
    SetDecision, StartOptions, WalReceiveOptions,
};

use crate::config::{self, CatalogLocation, Config};
use crate::output::{self, human_bytes, CliProgress};
use crate::{
    keys, on_worker, runtime, BackupCmd, ImportCmd, InstanceCmd, KeyCmd, RepoCmd, RestoreArgs,
    WalCmd,
};

/// Prints `value` as pretty JSON when `json` is set, else through `table`.
fn print<T: Serialize + ?Sized>(json: bool, value: &T, table: impl FnOnce(&T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(())
}

/// `strata catalog migrate --to URL`: the configured SQLite catalog copied
/// into an empty PostgreSQL catalog, checked row for row.
pub(crate) fn catalog_migrate(config: &Config, to: &str, json: bool) -> Result<()> {
    let CatalogLocation::Sqlite(path) = config.catalog_location()? else {
        bail!(
            "`catalog` already names a PostgreSQL database; migrate copies from a SQLite catalog"
        );
    };
    if !path.is_file() {
        bail!("no SQLite catalog at {}", path.display());
    }
    if !strata_catalog::PgConnect::is_url(to) {
        bail!("--to must be a postgres:// URL");
    }
    let source = crate::open_sqlite(&path)?;
    let connect = config.pg_connect(to)?;
    let target = strata_catalog::PgCatalog::open(&connect)
        .with_context(|| format!("cannot open catalog {}", connect.redacted()))?;
    let copied = strata_catalog::copy_sqlite_to_postgres(&source, &target)
        .with_context(|| format!("cannot copy {} to {}", path.display(), connect.redacted()))?;
    print(json, &copied, |tables| {
        for t in tables {
            println!("{:<24} {:>9} rows", t.table, t.rows);
        }
        let rows: usize = tables.iter().map(|t| t.rows).sum();
        println!(
            "copied {rows} rows in {} tables from {} to {}, each checked against the source",
            tables.len(),
            path.display(),
            connect.redacted()
        );
        println!(
            "now set `catalog = \"{}\"` in the configuration",
            connect.redacted()
        );
    })
}

/// `strata instance add|list`.
pub(crate) fn instance(engine: &Engine, cmd: InstanceCmd) -> Result<()> {
    match cmd {
        InstanceCmd::Add {
            id,
            host,
            port,
            user,
            password_env,
            dbname,
            sslmode,
            sslrootcert,
            no_check,
            agent,
            agent_key_file,
            agent_ca,
        } => {
            if !Instance::valid_id(&id) {
                bail!("instance id {id:?} may only use letters, digits, '-', '_' and '.' (at most 64)");
            }
            if let Some(var) = password_env
                .as_deref()
                .filter(|v| !Instance::valid_env_name(v))
            {
                bail!("--password-env {var:?} is not an environment variable name (letters, digits and '_', not starting with a digit)");
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
            if let Some(url) = agent {
                let Some(key_file) = agent_key_file else {
                    bail!("--agent needs --agent-key-file: the key the agent wrote on its first start");
                };
                let key = strata_agent::AgentKey::load(&key_file)
                    .map_err(|e| anyhow::anyhow!("agent key {}: {e}", key_file.display()))?;
                let ca = agent_ca.map(|p| p.display().to_string());
                if no_check {
                    bail!("--agent cannot be checked with --no-check; register without --no-check");
                }
                let facts =
                    runtime()?.block_on(engine.attach_agent(&mut instance, &url, &key, ca))?;
                println!(
                    "agent at {url}: data directory {} on {} ({} free)",
                    facts.data_dir.display(),
                    facts.fs.fs_type,
                    human_bytes(facts.fs.free_bytes)
                );
            }
            engine.add_instance(&instance)?;
            for warning in strata_engine::connection_warnings(&instance) {
                eprintln!("warning: instance {id}: {warning}");
            }
            println!("instance {id} added");
            Ok(())
        }
        InstanceCmd::List { json } => {
            let list = engine.catalog().list_instances()?;
            print(json, &list[..], output::print_instances)
        }
        InstanceCmd::Modify {
            id,
            password_env,
            no_password_env,
            sslmode,
            sslrootcert,
        } => {
            if password_env.is_none() && !no_password_env && sslmode.is_none() {
                bail!("nothing to change: give --password-env VAR, --no-password-env or --sslmode MODE");
            }
            // Parsed before anything changes: one refusal changes nothing.
            let sslmode: Option<SslMode> = sslmode.map(|m| m.parse()).transpose()?;
            let mut instance = engine.catalog().get_instance(&id)?;
            let changes_password = password_env.is_some() || no_password_env;
            if changes_password {
                instance = engine.set_password_env(&id, password_env)?;
            }
            if let Some(mode) = sslmode {
                let cert = sslrootcert.map(|p| Some(p.display().to_string()));
                instance = engine.set_tls(&id, mode, cert)?;
                println!("instance {id}: sslmode={}", instance.sslmode);
                for warning in strata_engine::connection_warnings(&instance) {
                    eprintln!("warning: instance {id}: {warning}");
                }
            }
            if !changes_password {
                return Ok(());
            }
            match &instance.password_env {
                Some(var) => {
                    println!("instance {id}: the password is read from {var}");
                    if std::env::var_os(var).is_none() {
                        eprintln!("warning: {var} is not set here; `strata serve` and every command that connects to {id} need it in their environment");
                    }
                }
                None => println!(
                    "instance {id}: {}",
                    if instance.password.is_some() {
                        "the password stored with it is used"
                    } else {
                        "no password is sent"
                    }
                ),
            }
            Ok(())
        }
    }
}

/// `strata import basebackup|pgbackrest`.
pub(crate) fn import(engine: &Engine, cmd: ImportCmd) -> Result<()> {
    let progress = std::sync::Arc::new(CliProgress::new());
    let started = std::time::Instant::now();
    let sets = {
        let (engine, progress) = (engine.clone(), progress.clone());
        on_worker(async move {
            Ok(match cmd {
                ImportCmd::Basebackup { instance, dir } => vec![
                    engine
                        .import_basebackup(&instance, &dir, &*progress)
                        .await?,
                ],
                ImportCmd::Pgbackrest {
                    instance,
                    repo,
                    stanza,
                } => {
                    engine
                        .import_pgbackrest(&instance, &repo, &stanza, &*progress)
                        .await?
                }
            })
        })?
    };
    progress.finish();
    for set in &sets {
        println!(
            "imported backup {} of {}: {} in {} files, WAL {} to {}; {} new ({} stored), {} deduplicated",
            set.id,
            set.instance_id,
            human_bytes(set.total_bytes),
            set.file_count,
            set.start_lsn.map(|l| l.to_string()).unwrap_or_default(),
            set.stop_lsn.map(|l| l.to_string()).unwrap_or_default(),
            human_bytes(set.new_bytes),
            human_bytes(set.stored_bytes),
            human_bytes(set.dedup_bytes),
        );
    }
    println!("{:.1}s", started.elapsed().as_secs_f64());
    for set in &sets {
        println!("{}", set.id);
    }
    Ok(())
}

pub(crate) fn backup(engine: &Engine, cmd: BackupCmd) -> Result<()> {
    match cmd {
        BackupCmd::Create {
            id,
            max_rate,
            snapshot,
        } => {
            let opts = BackupOptions {
                mode: BackupMode::Manual,
                taken_under: None,
                max_rate_kb: max_rate,
                method: if snapshot {
                    BackupMethod::Snapshot
                } else {
                    BackupMethod::Physical
                },
            };
            let progress = std::sync::Arc::new(CliProgress::new());
            let started = std::time::Instant::now();
            let set = {
                let (engine, progress) = (engine.clone(), progress.clone());
                on_worker(async move { Ok(engine.backup(&id, &opts, &*progress).await?) })?
            };
            progress.finish();
            if snapshot {
                println!(
                    "snapshot backup {} of {}: {} in {} files on the database host, consistent at {}; {:.1}s",
                    set.id,
                    set.instance_id,
                    human_bytes(set.total_bytes),
                    set.file_count,
                    set.stop_lsn.map(|l| l.to_string()).unwrap_or_default(),
                    started.elapsed().as_secs_f64()
                );
                println!("{}", set.id);
                return Ok(());
            }
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
            Ok(())
        }
        BackupCmd::Upload { id, backup } => {
            let set = engine.catalog().get_backup(&backup)?;
            if set.instance_id.as_str() != id {
                bail!(
                    "backup {backup} belongs to instance {}, not {id}",
                    set.instance_id
                );
            }
            if set.method != BackupMethod::Snapshot {
                bail!("backup {backup} is not a snapshot backup: it is in the repository already");
            }
            let mut job = engine
                .catalog()
                .create_job(strata_catalog::JobKind::SnapshotUpload, Some(&id))?;
            job.backup_id = Some(set.id.clone());
            engine.catalog().update_job(&job)?;
            let progress = std::sync::Arc::new(CliProgress::new());
            let started = std::time::Instant::now();
            let (set, report) = {
                let (engine, progress) = (engine.clone(), progress.clone());
                on_worker(async move { Ok(engine.run_snapshot_upload(job, &*progress).await?) })?
            };
            progress.finish();
            println!(
                "snapshot backup {} of {} uploaded: {} in {} files; read {} from the agent, reused {}{}; {} new ({} stored), {} deduplicated; {:.1}s",
                set.id,
                set.instance_id,
                human_bytes(report.total_bytes),
                report.files,
                human_bytes(report.read_bytes),
                human_bytes(report.reused_bytes),
                report
                    .base
                    .as_ref()
                    .map(|b| format!(" from backup {b}"))
                    .unwrap_or_default(),
                human_bytes(set.new_bytes),
                human_bytes(set.stored_bytes),
                human_bytes(set.dedup_bytes),
                started.elapsed().as_secs_f64()
            );
            println!("{}", set.id);
            Ok(())
        }
        BackupCmd::List { id, json } => {
            engine.catalog().get_instance(&id)?;
            engine.fail_expired_jobs()?;
            let list = engine.catalog().list_backups(&id)?;
            let decision = engine.retention_decision(&policy_of(engine, &id)?, Utc::now())?;
            if json {
                let listed: Vec<ListedSet> = list
                    .iter()
                    .zip(&decision.sets)
                    .map(|(set, d)| ListedSet {
                        set,
                        kept_by: d.kept_by.to_string(),
                        expires_at: d.expires_at,
                    })
                    .collect();
                return print(json, &listed[..], |_| ());
            }
            output::print_backups(&list, &decision.sets);
            Ok(())
        }
        BackupCmd::Keep {
            id,
            backup,
            until,
            note,
        } => {
            engine.catalog().get_instance(&id)?;
            let until = match until {
                Some(t) => KeepUntil::Until(parse_date_or_time(&t)?),
                None => KeepUntil::Forever,
            };
            strata_service::policy::check_keep(until, note.as_deref(), Utc::now())?;
            let set = engine.keep_backup_set(&id, &backup, Some((until, note)))?;
            match set.keep_until {
                Some(KeepUntil::Until(t)) => println!("kept {} until {t}", set.id),
                _ => println!("kept {} until released", set.id),
            }
            Ok(())
        }
        BackupCmd::Release { id, backup } => {
            engine.catalog().get_instance(&id)?;
            let set = engine.keep_backup_set(&id, &backup, None)?;
            println!("released {}: retention decides its fate again", set.id);
            Ok(())
        }
        BackupCmd::Show { id, backup, json } => {
            engine.catalog().get_instance(&id)?;
            let m = engine
                .for_instance_blocking(&id)?
                .repo()
                .read_manifest(&id, &backup)?;
            let summary = output::BackupSummary::of(&m);
            print(json, &summary, output::BackupSummary::print)
        }
    }
}

/// An instance's stored policy, or the one it gets when it has none yet.
fn policy_of(engine: &Engine, id: &str) -> Result<BackupPolicy> {
    Ok(match engine.catalog().get_policy(id)? {
        Some(p) => p,
        None => strata_service::policy::default_policy(id, Utc::now()),
    })
}

/// A date (`YYYY-MM-DD`, midnight UTC) or a time as [`parse_time`] reads it.
fn parse_date_or_time(s: &str) -> Result<DateTime<Utc>> {
    match chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        Ok(d) => Ok(d.and_time(chrono::NaiveTime::MIN).and_utc()),
        Err(_) => parse_time(s),
    }
}

/// A set as `backup list --json` prints it: its fields, what keeps it and
/// its expected expiry.
#[derive(Serialize)]
struct ListedSet<'a> {
    #[serde(flatten)]
    set: &'a strata_catalog::BackupSet,
    kept_by: String,
    expires_at: Option<DateTime<Utc>>,
}

/// One instance's retention decision, as the dry run prints it.
#[derive(Serialize)]
struct RetentionReport {
    instance_id: String,
    sets: Vec<SetDecision>,
    /// Keys of the WAL objects that go.
    wal: Vec<String>,
}

/// `strata repo retention [--dry-run]`.
fn retention(
    engine: &Engine,
    dry_run: bool,
    json: bool,
    instance: Option<String>,
    at: Option<String>,
) -> Result<()> {
    let now = match at {
        Some(t) => parse_date_or_time(&t)?,
        None => Utc::now(),
    };
    let ids: Vec<String> = match instance {
        Some(id) => {
            engine.catalog().get_instance(&id)?;
            vec![id]
        }
        None => engine
            .catalog()
            .list_instances()?
            .into_iter()
            .map(|i| i.id.to_string())
            .collect(),
    };
    let mut reports = Vec::new();
    for id in ids {
        let policy = policy_of(engine, &id)?;
        let decision = engine.retention_decision(&policy, now)?;
        if !dry_run {
            let plan = engine.apply_retention(&policy, now)?;
            if !json {
                println!(
                    "{id}: deleted {} backup set(s) and {} WAL object(s){}",
                    plan.backups.len(),
                    plan.wal.len(),
                    if plan.wal_postponed > 0 {
                        format!(
                            " ({} WAL object(s) left for later: the repository is in use)",
                            plan.wal_postponed
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
        reports.push(RetentionReport {
            instance_id: id,
            sets: decision.sets,
            wal: decision.wal.into_iter().map(|w| w.object_key).collect(),
        });
    }
    if json {
        return print(true, &reports, |_| ());
    }
    if dry_run {
        output::print_retention(
            reports
                .iter()
                .map(|r| (r.instance_id.as_str(), &r.sets[..], r.wal.len())),
        );
    }
    Ok(())
}

/// `strata wal receive|list`.
pub(crate) fn wal(engine: &Engine, cmd: WalCmd) -> Result<()> {
    match cmd {
        WalCmd::Receive { id, no_reconnect } => {
            engine.catalog().get_instance(&id)?;
            let engine = engine.clone();
            on_worker(async move {
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
            })
        }
        WalCmd::List { id, json } => {
            engine.catalog().get_instance(&id)?;
            let list = engine.catalog().list_wal_segments(&id)?;
            print(json, &list[..], output::print_wal)
        }
        WalCmd::Events {
            id,
            since,
            until,
            table,
            database,
            kind,
            json,
        } => {
            engine.catalog().get_instance(&id)?;
            for k in &kind {
                if !strata_engine::EVENT_KINDS
                    .iter()
                    .any(|known| known.eq_ignore_ascii_case(k))
                {
                    bail!(
                        "unknown event kind {k:?}: expected one of {}",
                        strata_engine::EVENT_KINDS.join(", ")
                    );
                }
            }
            let filter = EventFilter {
                since: since.as_deref().map(parse_time).transpose()?,
                until: until.as_deref().map(parse_time).transpose()?,
                kinds: kind,
                database,
                table,
            };
            let events = engine.recovery_events(&id, &filter)?;
            print(json, &events[..], output::print_events)
        }
    }
}

/// The recovery target the restore arguments ask for (clap allows at most one).
fn recovery_target(args: &RestoreArgs) -> Result<RecoveryTarget> {
    Ok(if let Some(t) = &args.time {
        RecoveryTarget::Time(parse_time(t)?)
    } else if let Some(l) = &args.lsn {
        RecoveryTarget::Lsn {
            lsn: l
                .parse::<Lsn>()
                .map_err(|_| anyhow::anyhow!("invalid LSN {l:?} (expected e.g. 0/3000000)"))?,
            inclusive: !args.exclusive,
        }
    } else if let Some(xid) = args.xid {
        if xid == 0 {
            anyhow::bail!("invalid transaction id 0 (1 to 4294967295)");
        }
        RecoveryTarget::Xid {
            xid,
            inclusive: !args.exclusive,
        }
    } else if let Some(n) = &args.name {
        RecoveryTarget::Name(n.clone())
    } else if args.immediate {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::Latest
    })
}

/// `strata restore`.
pub(crate) fn restore(engine: &Engine, args: &RestoreArgs) -> Result<()> {
    let opts = RestoreOptions {
        target_dir: args.target_dir.clone(),
        delta: args.delta,
        backup_id: args.backup.as_deref().map(Into::into),
        target: recovery_target(args)?,
        start: match (args.start, args.port) {
            (true, Some(port)) => Some(StartOptions {
                port,
                ..Default::default()
            }),
            _ => None,
        },
        job_id: None,
        index: None,
    };
    // A delta restore compares with the repository's blocks; a snapshot on
    // this host is reflinked into an empty directory.
    let local = match args.delta {
        true => None,
        false => local_snapshot(engine, &args.id, &opts)?,
    };
    let progress = CliProgress::new();
    let outcome = match &local {
        Some(local) => engine.restore_local_snapshot(&args.id, &opts, local, &progress)?,
        None => engine.restore(&args.id, &opts, &progress)?,
    };
    progress.finish();
    if let Some(local) = &local {
        if !args.json {
            println!(
                "reflinked from the snapshot {} on this host",
                local.dir.display()
            );
        }
    }
    print(args.json, &outcome, print_restore)
}

/// The snapshot set `opts` names when it is still on this host and can be
/// reflinked into the target (the CLI runs on the database host); `None`
/// otherwise, the agent unreachable included: the repository restores it.
fn local_snapshot(
    engine: &Engine,
    id: &str,
    opts: &RestoreOptions,
) -> Result<Option<strata_engine::LocalSnapshot>> {
    let Some(backup) = &opts.backup_id else {
        return Ok(None);
    };
    let instance = engine.catalog().get_instance(id)?;
    let is_local = engine
        .catalog()
        .get_backup(backup)
        .is_ok_and(|b| b.instance_id == instance.id && b.snapshot_local);
    if instance.agent_url.is_none() || !is_local {
        return Ok(None);
    }
    let facts = crate::runtime()?.block_on(engine.check_agent(&instance));
    match facts {
        Ok(facts) => Ok(engine.local_snapshot(id, opts, &facts.snapshot_dir)?),
        Err(e) => {
            eprintln!("note: {e}; restoring backup {backup} from the repository");
            Ok(None)
        }
    }
}

fn print_restore(outcome: &RestoreOutcome) {
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
    if let Some(d) = &outcome.delta {
        println!(
            "delta: wrote {} ({} blocks; {} files whole, {} patched), reused {} blocks ({} files unchanged), removed {} entries",
            human_bytes(d.bytes_written),
            d.blocks_written,
            d.files_written,
            d.files_patched,
            d.blocks_reused,
            d.files_unchanged,
            d.removed
        );
    }
    match outcome.started_port {
        Some(port) => println!(
            "server running on port {port}{}",
            outcome
                .recovery_stop
                .as_ref()
                .map(|s| format!(" ({})", s.trim()))
                .unwrap_or_default()
        ),
        None => println!(
            "start it with: pg_ctl -D {} start (recovery runs on start)",
            outcome.target_dir.display()
        ),
    }
}

/// `strata task list`.
pub(crate) fn tasks(engine: &Engine, instance_id: Option<&str>, json: bool) -> Result<()> {
    engine.fail_expired_jobs()?;
    let jobs = engine.catalog().list_jobs(instance_id)?;
    print(json, &jobs[..], output::print_jobs)
}

/// `strata repo verify|usage|rotate-key|reindex|gc`.
pub(crate) fn repo(config: &Config, engine: &Engine, cmd: RepoCmd) -> Result<()> {
    match cmd {
        RepoCmd::Verify { json } => {
            let progress = CliProgress::objects();
            let report = engine
                .whole_repo_blocking("verify")?
                .verify(&|done, total| {
                    strata_engine::Progress::update(&progress, "verify", done, Some(total))
                })?;
            progress.finish();
            print(json, &report, output::print_verify)?;
            if !report.is_clean() {
                bail!(
                    "repository verification found {} problem(s)",
                    report.problems.len()
                );
            }
            Ok(())
        }
        RepoCmd::Usage { json, region } => {
            let repo = match region {
                Some(id) => config.regions()?.target(&id)?.repository()?,
                None => {
                    let (repo, locked) = engine.readable_repo_blocking()?;
                    for l in locked {
                        eprintln!(
                            "warning: instance {}: backups encrypted under KMS key {} cannot be read now ({}); its figures are incomplete",
                            l.instance_id, l.kms_key_id, l.error
                        );
                    }
                    repo
                }
            };
            let usage = repo.measure_usage(&mut Default::default())?;
            print(json, &usage, output::print_usage)
        }
        RepoCmd::BenchFill {
            instance,
            copies,
            blocks,
            manifests,
            blocks_per_pack,
        } => bench_fill(
            engine,
            &instance,
            copies,
            blocks,
            manifests,
            blocks_per_pack,
        ),
        RepoCmd::RotateKey {
            new_key_file,
            new_passphrase_env,
        } => {
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
            Ok(())
        }
        RepoCmd::Gc { json } => match engine.collect_garbage()? {
            Some(report) => print(json, &report, |r| {
                println!(
                    "deleted {} pack(s), {} kept, {} pending until their grace period is over",
                    r.packs_deleted, r.packs_kept, r.packs_pending
                );
                if r.packs_locked > 0 {
                    println!(
                        "{} unreferenced pack(s) kept by Object Lock{}",
                        r.packs_locked,
                        r.locked_until
                            .map(|u| format!(" until {}", u.to_rfc3339()))
                            .unwrap_or_default()
                    );
                }
                if r.packs_refused > 0 {
                    println!(
                        "{} unreferenced pack(s) the store refused to delete: {}",
                        r.packs_refused,
                        r.refused_reason.as_deref().unwrap_or("no reason given")
                    );
                }
            }),
            None if json => {
                println!("null");
                Ok(())
            }
            None => {
                println!("skipped: a backup or a reader holds the repository; try again later");
                Ok(())
            }
        },
        RepoCmd::Retention {
            dry_run,
            json,
            instance,
            at,
        } => retention(engine, dry_run, json, instance, at),
        RepoCmd::Reindex => {
            let report = engine.reindex()?;
            println!(
                "reindexed {} instance(s) ({} added), {} backup set(s), {} WAL object(s); block index rebuilt: {} block(s)",
                report.instances, report.instances_added, report.backups, report.wal_segments, report.blocks
            );
            for u in &report.password_env_not_restored {
                eprintln!(
                    "warning: instance {}: registered without its password variable {}: the records of an unencrypted repository are not authenticated. Check that {}:{} as {} with sslmode={} is the server, then run `strata instance modify {} --password-env {}`",
                    u.instance, u.variable, u.host, u.port, u.user, u.sslmode, u.instance, u.variable
                );
            }
            Ok(())
        }
    }
}

/// `strata key create|list|delete`.
pub(crate) fn key(engine: &Engine, cmd: KeyCmd) -> Result<()> {
    match cmd {
        KeyCmd::Create {
            read_only,
            description,
            json,
        } => {
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
            Ok(())
        }
        KeyCmd::List { json } => {
            let list = engine.catalog().list_access_keys()?;
            print(json, &list[..], |list| {
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
            })
        }
        KeyCmd::Delete { id } => {
            if !engine.catalog().delete_access_key(&id)? {
                bail!("no AccessKey {id:?}");
            }
            println!("deleted AccessKey {id}");
            Ok(())
        }
    }
}

/// A time given on the command line: RFC 3339, or RDS's spelling without seconds.
pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // RDS spells times without seconds: 2026-11-25T10:00Z.
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%MZ") {
        return Ok(t.and_utc());
    }
    bail!("invalid time {s:?} (expected RFC 3339, e.g. 2026-11-25T10:00:00Z)")
}

/// `strata repo bench-fill`: earlier sets and a synthetic block index for
/// the block index benchmark. Synthetic sets get ids older than every real
/// one; their blocks are in empty packs, so such a repository is good for
/// measuring backups into it and nothing else.
fn bench_fill(
    engine: &Engine,
    instance: &str,
    copies: u64,
    blocks: u64,
    manifests: u64,
    per_pack: u64,
) -> Result<()> {
    use strata_repo::{BackupId, BlockHash, BlockRef, FileEntry, FileKind, PackId};
    let repo = engine.repo();
    let newest = repo
        .list_backups(instance)?
        .pop()
        .context("the instance has no backup set to start from")?;
    let base = repo.read_manifest(instance, &newest)?;
    let first: u64 = newest.parse().context("backup ids are numbers")?;
    let mut covers = Vec::new();
    for k in 0..copies {
        let mut m = base.clone();
        m.backup_id = BackupId::from((first - 10_000_000 - k).to_string());
        repo.commit_manifest(&m)?;
        covers.push(m.backup_id);
    }
    if blocks > 0 {
        let (manifests, per_pack) = (manifests.clamp(1, blocks), per_pack.max(1));
        let packs: Vec<PackId> = (0..blocks.div_ceil(per_pack))
            .map(|_| PackId::new(hex::encode(rand::random::<[u8; 16]>())))
            .collect();
        for p in &packs {
            repo.storage().put(&strata_repo::pack_key(p), b"")?;
        }
        // Sorted, distinct and uniform: block i's hash starts in the i-th
        // of `blocks` equal slices of the hash space.
        let seed: [u8; 32] = rand::random();
        let step = u64::MAX / blocks;
        let block = |i: u64| {
            let mut hash = *blake3::keyed_hash(&seed, &i.to_le_bytes()).as_bytes();
            let at = i * step + u64::from_le_bytes(hash[..8].try_into().expect("8 bytes")) % step;
            hash[..8].copy_from_slice(&at.to_be_bytes());
            BlockRef {
                hash: BlockHash(hash),
                pack: packs[(i / per_pack) as usize].clone(),
                offset: 16 + (i % per_pack) * 65_100,
                stored_len: 65_000,
                raw_len: 131_072,
                compression: 1,
            }
        };
        for j in 0..manifests {
            let range = j * blocks / manifests..(j + 1) * blocks / manifests;
            let mut m = base.clone();
            m.backup_id = BackupId::from((first - 20_000_000 - j).to_string());
            m.tablespaces.clear();
            m.server_manifest = None;
            m.files = vec![FileEntry {
                tablespace: None,
                path: "base/1/synthetic".into(),
                kind: FileKind::File,
                mode: 0o600,
                size: (range.end - range.start) * 131_072,
                mtime: 0,
                link_target: None,
                crc32c: None,
                blocks: range.map(block).collect(),
            }];
            repo.commit_manifest(&m)?;
            covers.push(m.backup_id);
        }
        let written = repo.import_index_run(instance, covers, (0..blocks).map(block))?;
        println!(
            "{written} synthetic blocks in {} packs, {manifests} synthetic sets",
            packs.len()
        );
    } else if !covers.is_empty() {
        // The copies hold the newest set's blocks, which its run holds already.
        repo.import_index_run(instance, covers, std::iter::empty())?;
    }
    println!("{copies} copies of backup {newest}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn restore_args(extra: &[&str]) -> RestoreArgs {
        let mut argv = vec!["strata", "restore", "db1", "--target-dir", "/tmp/x"];
        argv.extend_from_slice(extra);
        match crate::Cli::try_parse_from(argv)
            .expect("arguments parse")
            .command
        {
            crate::Command::Restore(args) => args,
            _ => unreachable!("the restore subcommand was given"),
        }
    }

    #[test]
    fn each_restore_flag_chooses_its_target() {
        let t = |extra: &[&str]| recovery_target(&restore_args(extra)).unwrap().to_string();
        assert_eq!(t(&[]), RecoveryTarget::Latest.to_string());
        assert_eq!(t(&["--immediate"]), RecoveryTarget::Immediate.to_string());
        assert_eq!(
            t(&["--xid", "742"]),
            RecoveryTarget::Xid {
                xid: 742,
                inclusive: true
            }
            .to_string()
        );
        assert_eq!(
            t(&["--xid", "742", "--exclusive"]),
            "just before transaction 742"
        );
        assert_eq!(
            t(&["--lsn", "0/3000028", "--exclusive"]),
            "just before LSN 0/3000028"
        );
        assert_eq!(
            t(&["--name", "before-upgrade"]),
            RecoveryTarget::Name("before-upgrade".into()).to_string()
        );
        assert_eq!(
            t(&["--lsn", "0/3000000"]),
            RecoveryTarget::Lsn {
                lsn: "0/3000000".parse().unwrap(),
                inclusive: true
            }
            .to_string()
        );
        assert_eq!(
            t(&["--time", "2026-11-25T10:00Z"]),
            RecoveryTarget::Time(parse_time("2026-11-25T10:00:00Z").unwrap()).to_string()
        );
    }

    #[test]
    fn conflicting_or_malformed_targets_are_refused() {
        let argv = [
            "strata",
            "restore",
            "db1",
            "--target-dir",
            "/x",
            "--xid",
            "1",
            "--immediate",
        ];
        assert!(crate::Cli::try_parse_from(argv).is_err());
        // --exclusive says which side of an xid or LSN; alone it means nothing.
        for extra in [
            &["--exclusive"][..],
            &["--time", "2026-11-25T10:00Z", "--exclusive"],
        ] {
            let argv = ["strata", "restore", "db1", "--target-dir", "/x"];
            let argv: Vec<&str> = argv.iter().chain(extra).copied().collect();
            assert!(crate::Cli::try_parse_from(argv).is_err(), "{extra:?}");
        }
        let err = recovery_target(&restore_args(&["--xid", "0"])).unwrap_err();
        assert!(err.to_string().contains("invalid transaction id"), "{err}");
        let err = recovery_target(&restore_args(&["--lsn", "3000000"])).unwrap_err();
        assert!(err.to_string().contains("invalid LSN"), "{err}");
        let err = recovery_target(&restore_args(&["--time", "yesterday"])).unwrap_err();
        assert!(err.to_string().contains("invalid time"), "{err}");
    }

    #[test]
    fn times_parse_with_and_without_seconds_and_offsets() {
        let cases = [
            ("2026-11-25T10:00:00Z", "2026-11-25T10:00:00+00:00"),
            ("2026-11-25T10:00Z", "2026-11-25T10:00:00+00:00"),
            ("2026-11-25T12:30:05+02:00", "2026-11-25T10:30:05+00:00"),
            ("2026-11-25T10:00:00.250Z", "2026-11-25T10:00:00.250+00:00"),
        ];
        for (given, want) in cases {
            assert_eq!(parse_time(given).unwrap().to_rfc3339(), want, "{given}");
        }
        for bad in ["", "2026-11-25", "10:00Z", "2026-13-01T00:00Z"] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
    }
}

/// One sink's answer to `strata notify test`.
#[derive(Serialize)]
struct TestDelivery {
    sink: String,
    kind: &'static str,
    delivered: bool,
    /// The far end's answer, or why nothing was delivered.
    result: String,
    attempts: u32,
}

/// `strata notify test [--sink NAME]`: a test event to every configured
/// sink (or the one named), each result reported; fails when any failed.
pub(crate) async fn notify_test(
    notifier: &strata_notify::Notifier,
    only: Option<&str>,
    json: bool,
) -> Result<()> {
    let sinks: Vec<&strata_notify::Sink> = notifier
        .sinks()
        .iter()
        .filter(|s| only.is_none_or(|n| s.name() == n))
        .collect();
    match (only, sinks.is_empty()) {
        (Some(name), true) => bail!("no notification sink is named {name:?}"),
        (None, true) => {
            bail!("no notification sink is configured ([[notify.webhook]], [[notify.email]])")
        }
        _ => {}
    }
    let event = strata_notify::Sink::test_event("strata notify test");
    let mut results = Vec::new();
    for sink in sinks {
        let (delivered, result, attempts) = match sink.deliver(&event).await {
            Ok(d) => (true, d.answer, d.attempts),
            Err(strata_notify::NotifyError::Failed { attempts, reason }) => {
                (false, reason, attempts)
            }
            Err(e) => (false, e.to_string(), 0),
        };
        results.push(TestDelivery {
            sink: sink.name().to_string(),
            kind: sink.kind(),
            delivered,
            result,
            attempts,
        });
    }
    print(json, &results[..], |rows| {
        for r in rows {
            let outcome = if r.delivered { "delivered" } else { "FAILED" };
            println!(
                "{:<20} {:<8} {outcome}: {} ({} attempt(s))",
                r.sink, r.kind, r.result, r.attempts
            );
        }
    })?;
    let failed = results.iter().filter(|r| !r.delivered).count();
    if failed > 0 {
        bail!("{failed} of {} sink(s) failed", results.len());
    }
    Ok(())
}
