//! `strata serve`: the API, the web console, the scheduler, WAL receivers
//! and retention in one process; with `--demo`, also a sandbox PostgreSQL with sample data,
//! registered and archived like any other instance, stopped with the server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use strata_api::{ApiState, LinkSigner, MetricsAccess, TlsFiles};
use strata_catalog::{BackupStatus, Instance, SslMode};
use strata_console::ConsoleState;
use strata_engine::{as_user, chown_tree, Engine, LocalServer, ServerUse};
use strata_service::{Service, SystemClock};

use crate::config::Config;
use crate::keys;

/// The instance id the sandbox registers as.
pub const DEMO_INSTANCE: &str = "demo";

pub fn serve(config: &Config, engine: Engine, listen: Option<String>, demo: bool) -> Result<()> {
    let data_dir = config.data_dir();
    let listen = listen.unwrap_or_else(|| config.listen());
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let metrics = MetricsAccess {
        token: config.metrics.token()?,
        own_listener: config.metrics.listen.is_some(),
    };
    let created = keys::ensure_admin_key(engine.catalog().as_ref(), &data_dir)?;
    let regions = config.regions()?;
    let node_id = config.node_id()?;
    crate::runtime()?.block_on(async move {
        // Signals first: a stop request during the sandbox's start still
        // ends in an orderly shutdown.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stopper = stop_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stopper.send(true);
        });
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match &config.metrics.listen {
            Some(l) => Some(
                tokio::net::TcpListener::bind(l)
                    .await
                    .with_context(|| format!("cannot listen on {l} ([metrics] listen)"))?,
            ),
            None => None,
        };
        let sandbox = if demo {
            Some(Sandbox::start(&engine, &data_dir).await?)
        } else {
            None
        };
        let mut settings = config.service_settings()?;
        settings.node.id = node_id;
        settings.node.api_address = addr.to_string();
        let service = Service::with_regions(engine.clone(), Arc::new(SystemClock), settings, regions);
        if let Some(sb) = &sandbox {
            if service.instance(DEMO_INSTANCE).is_err() {
                if let Err(e) = service.register_instance(sb.instance(), None).await {
                    sb.stop();
                    return Err(anyhow::Error::new(e).context("registering the sandbox"));
                }
            }
        }
        // Read before the scheduler's first round, which may start a backup.
        let demo_backups = match &sandbox {
            Some(_) => Some(demo_backups(&service)?),
            None => None,
        };
        let scheduler = tokio::spawn(Arc::clone(&service).run(stop_rx.clone()));
        // One key for every node sharing the catalog, so any node serves a
        // link another signed; a key file an earlier release wrote seeds it
        // (links already handed out keep working).
        let candidate = LinkSigner::read_key_file(&data_dir.join("link-key"))
            .context("reading the old download link key")?
            .unwrap_or_else(rand::random);
        let key = {
            let engine = engine.clone();
            tokio::task::spawn_blocking(move || engine.shared_key("download-link-key", &candidate))
                .await?
                .context("loading the download link key from the catalog")?
        };
        let links = LinkSigner::new(
            key,
            config
                .downloads
                .public_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{addr}")),
            config.link_lifetime(),
        );
        let state = Arc::new(ApiState {
            service: Arc::clone(&service),
            links,
            host_id: addr.to_string(),
            metrics,
        });
        let url = format!("{scheme}://{addr}/");
        println!("strata: API listening on {url}");
        if let Some(l) = &metrics_listener {
            println!("strata: metrics on {scheme}://{}/metrics", l.local_addr()?);
        }
        println!("strata: console on {url}console/ (sign in with an AccessKey pair)");
        println!("strata: node {}", service.node_id());
        match &created {
            Some((key, path)) if demo => {
                println!("strata: admin AccessKey created: AccessKeyId {} AccessKeySecret {}", key.id, key.secret);
                println!("strata: (also stored in {}, mode 0600)", path.display());
            }
            Some((key, path)) => println!(
                "strata: admin AccessKey {} created; the pair is in {} (mode 0600)",
                key.id,
                path.display()
            ),
            None => {}
        }
        if let Some(sb) = &sandbox {
            let key_file = keys::admin_key_path(&data_dir);
            println!("strata: sandbox PostgreSQL {} on 127.0.0.1:{} (data in {}), registered as instance {DEMO_INSTANCE:?}", sb.major, sb.port, sb.pgdata.display());
            if let Some(backups) = &demo_backups {
                println!("strata: {backups}. Next steps:");
            }
            println!("  strata backup list {DEMO_INSTANCE}          # backup sets (CLI, same data directory)");
            println!("  strata task list {DEMO_INSTANCE}            # jobs and their progress");
            println!("  python3 -m venv strata-sdk && strata-sdk/bin/pip install {SDK_PACKAGES}");
            println!("  strata-sdk/bin/python your_script.py      # the official SDK; see README: \"Using the API\"");
            println!("  the key pair for the SDK is in {}", key_file.display());
            println!("strata: press Ctrl-C to stop the server and the sandbox");
        }
        let console = ConsoleState::new(Arc::clone(&state), scheme == "https");
        let metrics_app = strata_api::metrics_router(Arc::clone(&state));
        let app = strata_console::with_console(strata_api::router(state), console);
        let api = strata_api::serve(listener, app, tls.clone(), stop_rx.clone());
        let served = match metrics_listener {
            // Either failing stops both: a server whose metrics cannot be
            // served as configured should not look healthy.
            Some(l) => tokio::try_join!(api, strata_api::serve(l, metrics_app, tls, stop_rx))
                .map(|_| ()),
            None => api.await,
        };
        let _ = stop_tx.send(true);
        let _ = scheduler.await;
        if let Some(sb) = sandbox {
            sb.stop();
        }
        served.context("serving the API")?;
        eprintln!("strata: stopped");
        anyhow::Ok(())
    })
}

/// The PyPI packages the README's SDK example imports.
const SDK_PACKAGES: &str = "alibabacloud-rds20140815 alibabacloud-tea-openapi";

/// What happens to the sandbox's backups now, as the service will find it
/// on its first round: a first backup only for an instance that never had
/// one (see the scheduler), else what it has and when the next come.
fn demo_backups(service: &Service) -> Result<String> {
    let policy = service.policy(DEMO_INSTANCE)?;
    let sets = service.backup_sets(DEMO_INSTANCE)?;
    let wal = if policy.log_backup_enabled {
        "WAL is archived continuously"
    } else {
        "log backup is off"
    };
    if sets.is_empty() && policy.last_auto_slot.is_none() {
        return Ok(format!("its first backup starts now and {wal}"));
    }
    let newest = sets
        .iter()
        .filter(|b| b.status == BackupStatus::Success)
        .filter_map(|b| b.finished_at)
        .max();
    let have = match newest {
        Some(t) => format!(
            "it has {} backup set(s), the newest finished {}",
            sets.len(),
            t.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        None => format!(
            "it has no successful backup yet (strata backup create {DEMO_INSTANCE} takes one now)"
        ),
    };
    Ok(format!(
        "{have}; automatic backups run on {} in {}; {wal}",
        policy.backup_days.join(", "),
        policy.backup_window
    ))
}

/// A PostgreSQL cluster under `<data_dir>/demo`, run by the unprivileged
/// OS user with the newest local server binaries.
struct Sandbox {
    bin: PathBuf,
    major: u32,
    pgdata: PathBuf,
    dir: PathBuf,
    port: u16,
    os_user: Option<String>,
}

impl Sandbox {
    async fn start(engine: &Engine, data_dir: &Path) -> Result<Sandbox> {
        let (major, bin) = [18, 17, 16, 15, 14]
            .into_iter()
            .find_map(|m| {
                let dir = engine.pg_bin_dir(m).ok()?;
                (dir.join("initdb").is_file() && dir.join("psql").is_file()).then_some((m, dir))
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--demo needs PostgreSQL server binaries with initdb and psql (searched: {}); install postgresql-15 or set [postgres] bin_dirs",
                    engine.settings().pg_bin_dirs.join(", ")
                )
            })?;
        let os_user = engine.os_user();
        let dir = std::path::absolute(data_dir.join("demo"))?;
        let pgdata = dir.join("pgdata");
        let port_file = dir.join("port");
        std::fs::create_dir_all(&dir)?;
        let fresh = !pgdata.join("PG_VERSION").exists();
        let port = if fresh {
            free_port()?
        } else {
            std::fs::read_to_string(&port_file)
                .context("reading the sandbox's port")?
                .trim()
                .parse()
                .context("the sandbox's port file is damaged")?
        };
        let sb = Sandbox {
            bin,
            major,
            pgdata,
            dir,
            port,
            os_user,
        };
        if let Some(user) = &sb.os_user {
            chown_tree(&sb.dir, user)?;
            let probe = Command::new("runuser")
                .args(["-u", user, "--", "test", "-w"])
                .arg(&sb.dir)
                .status()?;
            if !probe.success() {
                bail!(
                    "the sandbox directory {} is not writable by OS user {user} (a parent directory is closed to it); use a data directory it can reach, e.g. STRATA_DATA_DIR=/var/lib/strata",
                    sb.dir.display()
                );
            }
        }
        if fresh {
            println!(
                "strata: initializing a sandbox PostgreSQL {major} in {}",
                sb.pgdata.display()
            );
            sb.run(
                "initdb",
                &[
                    "-D",
                    path(&sb.pgdata),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                ],
            )?;
            let conf = format!(
                "\n# strata --demo sandbox\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\n",
                sb.port,
                sb.dir.display()
            );
            std::fs::OpenOptions::new()
                .append(true)
                .open(sb.pgdata.join("postgresql.conf"))
                .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
                .context("configuring the sandbox")?;
            std::fs::write(&port_file, sb.port.to_string())?;
        }
        let log = sb.dir.join("postgres.log");
        sb.server()
            .start(
                &log,
                "",
                Some(std::time::Duration::from_secs(120)),
                ServerUse::Copy,
            )
            .with_context(|| format!("starting the sandbox (log: {})", log.display()))?;
        if fresh {
            sb.run(
                "psql",
                &[
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &sb.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                    SAMPLE_DATA,
                ],
            )
            .context("loading sample data into the sandbox")?;
        }
        Ok(sb)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let out = as_user(self.os_user.as_deref(), &self.bin.join(program))
            .args(args)
            .current_dir(&self.dir)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn instance(&self) -> Instance {
        Instance::new(
            DEMO_INSTANCE,
            "127.0.0.1",
            self.port,
            "postgres",
            SslMode::Disable,
        )
    }

    fn server(&self) -> LocalServer {
        LocalServer {
            bin: self.bin.clone(),
            data_dir: self.pgdata.clone(),
            os_user: self.os_user.clone(),
        }
    }

    fn stop(&self) {
        match self.server().stop(false) {
            Ok(()) => eprintln!("strata: sandbox PostgreSQL stopped"),
            Err(e) => eprintln!("strata: stopping the sandbox: {e}"),
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn free_port() -> Result<u16> {
    for port in 5433..5533 {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port between 5433 and 5532 for the sandbox")
}

const SAMPLE_DATA: &str = "
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, joined timestamptz NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
                     amount numeric(10,2) NOT NULL, placed timestamptz NOT NULL DEFAULT now());
INSERT INTO customers SELECT g, 'customer ' || g, now() - g * interval '1 hour' FROM generate_series(1, 1000) g;
INSERT INTO orders (customer_id, amount, placed)
  SELECT 1 + g % 1000, round((random() * 500)::numeric, 2), now() - g * interval '1 minute'
  FROM generate_series(1, 20000) g;
";
