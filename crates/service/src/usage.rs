//! Backup storage usage, the free quota and billable GB-hours.
//!
//! The scheduler measures the repository (`Repository::measure_usage`,
//! whose attribution rule is in crates/repo/src/usage.rs) at most once per
//! `UsageSettings::sample_interval`, and sooner after something changed what
//! is stored (a backup, a deletion, retention, garbage collection), and
//! records one [`UsageSample`] per instance with the free quota in force.
//! Billable GB-hours are the bytes above the quota integrated over time:
//! each sample's excess holds until the next sample (or the end of the
//! period), and a GB is 2^30 bytes.
//!
//! Each sample also records what the instance's cross-region copies hold:
//! every target region that holds or receives its copies is measured by
//! the same rule on the target's own listing. Those bytes are outside the
//! free quota (RDS bills cross-region backup storage on its own). A target
//! that cannot be reached keeps the instance's last known figure.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use strata_catalog::{BackupStatus, UsageSample};
use strata_repo::RepositoryUsage;

use crate::{lock, Service, ServiceResult};

/// When usage was last sampled, whether a sample is owed, and the
/// measurement caches (so a sample reads only what changed).
pub(crate) struct UsageState {
    /// A sample is owed at the next tick (what is stored changed).
    due: AtomicBool,
    last_sample: Mutex<Option<DateTime<Utc>>>,
    cache: Mutex<strata_repo::UsageCache>,
    /// The same, per target region measured for cross-region figures.
    cross_caches: Mutex<HashMap<String, strata_repo::UsageCache>>,
}

impl Default for UsageState {
    fn default() -> Self {
        UsageState {
            // The first tick samples.
            due: AtomicBool::new(true),
            last_sample: Mutex::new(None),
            cache: Mutex::new(strata_repo::UsageCache::default()),
            cross_caches: Mutex::new(HashMap::new()),
        }
    }
}

/// An instance's free backup storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeQuota {
    /// A fixed number of bytes.
    Bytes(u64),
    /// A percentage of the instance's database size (the data size of its
    /// newest successful backup set).
    PercentOfDatabase(u32),
}

/// RDS gives every instance free backup storage; Strata's default is twice
/// the database size, as RDS grants cloud-disk instances 200 % of their
/// storage (Strata has no purchased storage, so the database size stands in).
pub const DEFAULT_FREE_QUOTA: FreeQuota = FreeQuota::PercentOfDatabase(200);

impl FreeQuota {
    /// `"200%"`, `"50GiB"`, `"512MiB"`, `"1TiB"`, `"4096KiB"` or a number of
    /// bytes.
    pub fn parse(text: &str) -> Result<FreeQuota, String> {
        let t = text.trim();
        let bad = || {
            format!("free quota {text:?} must be a percentage (\"200%\") or a size (\"50GiB\", \"512MiB\", bytes)")
        };
        if let Some(p) = t.strip_suffix('%') {
            return p
                .trim()
                .parse()
                .map(FreeQuota::PercentOfDatabase)
                .map_err(|_| bad());
        }
        let units = [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        let (number, scale) = units
            .iter()
            .find_map(|(suffix, scale)| t.strip_suffix(suffix).map(|n| (n.trim(), *scale)))
            .unwrap_or((t, 1));
        let n: u64 = number.parse().map_err(|_| bad())?;
        n.checked_mul(scale).map(FreeQuota::Bytes).ok_or_else(bad)
    }

    /// The quota in bytes for a database of `database_bytes`.
    pub fn bytes(self, database_bytes: u64) -> u64 {
        match self {
            FreeQuota::Bytes(n) => n,
            FreeQuota::PercentOfDatabase(p) => {
                (database_bytes as u128 * p as u128 / 100).min(u64::MAX as u128) as u64
            }
        }
    }
}

/// As [`FreeQuota::parse`] reads it: `"200%"` or a number of bytes.
impl std::fmt::Display for FreeQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FreeQuota::Bytes(n) => write!(f, "{n}"),
            FreeQuota::PercentOfDatabase(p) => write!(f, "{p}%"),
        }
    }
}

/// Knobs of usage sampling.
#[derive(Debug, Clone)]
pub struct UsageSettings {
    /// Longest time between two samples.
    pub sample_interval: chrono::Duration,
    /// The quota of instances without one of their own.
    pub default_quota: FreeQuota,
    /// Quotas of single instances, by id.
    pub instance_quotas: HashMap<String, FreeQuota>,
}

impl Default for UsageSettings {
    fn default() -> Self {
        UsageSettings {
            sample_interval: chrono::Duration::minutes(10),
            default_quota: DEFAULT_FREE_QUOTA,
            instance_quotas: HashMap::new(),
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes above the quota integrated from `from` to `to`, in GB-hours: each
/// sample's excess holds from its time until the next sample's; the sample
/// in force at `from` is the last one taken at or before it (none: nothing
/// is billed before the first sample). `samples` are oldest first.
pub fn billable_gb_hours(samples: &[UsageSample], from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    let mut byte_ms: u128 = 0;
    for (i, s) in samples.iter().enumerate() {
        let start = s.at.max(from);
        let end = samples.get(i + 1).map_or(to, |next| next.at).min(to);
        if end > start {
            byte_ms += s.excess_bytes() as u128 * (end - start).num_milliseconds() as u128;
        }
    }
    byte_ms as f64 / (3_600_000.0 * GIB)
}

/// What `StrataDescribeBackupStorageUsage` reports.
#[derive(Debug, Clone)]
pub struct UsageReport {
    /// The newest sample: current figures.
    pub current: UsageSample,
    /// The quota rule of the instance.
    pub quota: FreeQuota,
    /// Samples taken in the period, oldest first.
    pub samples: Vec<UsageSample>,
    /// Start of the period.
    pub from: DateTime<Utc>,
    /// End of the period.
    pub to: DateTime<Utc>,
    /// GB-hours above the quota in the period.
    pub billable_gb_hours: f64,
}

impl Service {
    /// The quota rule of an instance.
    pub fn quota_rule(&self, instance_id: &str) -> FreeQuota {
        let usage = &self.settings.usage;
        usage
            .instance_quotas
            .get(instance_id)
            .copied()
            .unwrap_or(usage.default_quota)
    }

    /// The free quota of an instance now, in bytes.
    pub fn free_quota(&self, instance_id: &str) -> ServiceResult<u64> {
        let database = self
            .engine
            .catalog()
            .list_backups(instance_id)?
            .into_iter()
            .filter(|b| b.status == BackupStatus::Success)
            .max_by_key(|b| b.finished_at)
            .map_or(0, |b| b.total_bytes);
        Ok(self.quota_rule(instance_id).bytes(database))
    }

    /// Asks for a sample at the next tick (what is stored changed).
    pub(crate) fn usage_changed(&self) {
        self.usage.due.store(true, Ordering::SeqCst);
    }

    /// Measures the repository and records a sample for every registered
    /// instance when the interval has passed since the last one (by the
    /// service clock) or what is stored changed. The scheduler calls it
    /// every tick; returns whether it sampled.
    pub async fn sample_usage_if_due(self: &Arc<Self>) -> ServiceResult<bool> {
        let now = self.now();
        let due = {
            let last = lock(&self.usage.last_sample);
            self.usage.due.load(Ordering::SeqCst)
                || last.is_none_or(|t| now - t >= self.settings.usage.sample_interval || now < t)
        };
        if !due {
            return Ok(false);
        }
        self.usage.due.store(false, Ordering::SeqCst);
        let svc = Arc::clone(self);
        let recorded = tokio::task::spawn_blocking(move || svc.record_samples(now, true)).await;
        match recorded {
            Ok(Ok(())) => {
                *lock(&self.usage.last_sample) = Some(now);
                Ok(true)
            }
            Ok(Err(e)) => {
                self.usage.due.store(true, Ordering::SeqCst);
                Err(e)
            }
            Err(e) => {
                self.usage.due.store(true, Ordering::SeqCst);
                Err(crate::ServiceError::Engine(
                    strata_engine::EngineError::Conflict(format!(
                        "the usage measurement stopped: {e}"
                    )),
                ))
            }
        }
    }

    /// Measures now and records a sample per registered instance (blocking);
    /// `only_owned`: per instance this node reports (the scheduled samples:
    /// in a fleet each instance is sampled by its owner only, see
    /// [`Service::reports`]).
    fn record_samples(&self, now: DateTime<Utc>, only_owned: bool) -> ServiceResult<()> {
        // Every encrypted instance's domain that can be unlocked is read; one
        // that cannot (its KMS key disabled) keeps its last sample.
        let (repo, locked) = self.engine.readable_repo_blocking()?;
        for l in &locked {
            tracing::warn!(
                instance = %l.instance_id,
                "usage: backups encrypted under KMS key {} cannot be read now ({}); the instance keeps its last figures",
                l.kms_key_id,
                l.error
            );
        }
        let usage = {
            let mut cache = lock(&self.usage.cache);
            repo.measure_usage(&mut cache)
                .map_err(strata_engine::EngineError::from)?
        };
        let mut targets = HashMap::new();
        let owners = self.instance_owners()?;
        let instances = self.engine.catalog().list_instances()?;
        let desired = self.desired_owners(&instances)?;
        for instance in instances {
            if only_owned && !self.reports(&instance.id, &owners, &desired) {
                continue;
            }
            let figures = usage
                .instances
                .get(&instance.id)
                .cloned()
                .unwrap_or_default();
            if figures.locked || locked.iter().any(|l| l.instance_id == instance.id) {
                continue;
            }
            let sample = UsageSample {
                instance_id: instance.id.clone(),
                at: now,
                logical_bytes: figures.logical_bytes,
                data_bytes: figures.data_bytes(),
                wal_bytes: figures.wal_bytes,
                quota_bytes: self.free_quota(&instance.id)?,
                cross_region_bytes: self.cross_region_bytes(&instance.id, &mut targets)?,
            };
            // Keyed by (instance, time): made again, it replaces itself.
            strata_engine::retry_busy("recording a usage sample", || {
                self.engine.catalog().add_usage_sample(&sample)
            })?;
        }
        Ok(())
    }

    /// The regions that may hold an instance's copies: those of its copies
    /// in the catalog and the one its policy copies to.
    fn copy_regions(&self, instance_id: &str) -> ServiceResult<BTreeSet<String>> {
        let catalog = &self.engine.catalog();
        let mut regions: BTreeSet<String> = catalog
            .list_cross_backups(instance_id)?
            .into_iter()
            .map(|c| c.region)
            .chain(
                catalog
                    .list_cross_wal(instance_id)?
                    .into_iter()
                    .map(|w| w.region),
            )
            .collect();
        if let Some(policy) = catalog.get_cross_policy(instance_id)? {
            if !policy.region.is_empty() {
                regions.insert(policy.region);
            }
        }
        Ok(regions)
    }

    /// A target region's repository measured, opened as the copier opens
    /// it; `None` when it cannot be reached (or is no longer configured).
    fn measure_target(&self, region: &str) -> Option<RepositoryUsage> {
        let measured = self.regions.target(region).and_then(|target| {
            let repo = target.repository()?;
            let mut caches = lock(&self.usage.cross_caches);
            let cache = caches.entry(region.to_string()).or_default();
            Ok(repo
                .measure_usage(cache)
                .map_err(strata_engine::EngineError::from)?)
        });
        match measured {
            Ok(usage) => Some(usage),
            Err(e) => {
                tracing::warn!(region = %region, "measuring the cross-region target: {e}");
                None
            }
        }
    }

    /// What an instance's copies hold in every region that may have them,
    /// each target measured once per sampling (`targets`). When one cannot
    /// be measured, the instance's last known figure stands (none yet:
    /// unknown).
    fn cross_region_bytes(
        &self,
        instance_id: &str,
        targets: &mut HashMap<String, Option<RepositoryUsage>>,
    ) -> ServiceResult<Option<u64>> {
        let mut total = 0;
        for region in self.copy_regions(instance_id)? {
            let usage = targets
                .entry(region.clone())
                .or_insert_with(|| self.measure_target(&region));
            let Some(usage) = usage else {
                let last = self.engine.catalog().last_usage_sample(instance_id)?;
                return Ok(last.and_then(|s| s.cross_region_bytes));
            };
            total += usage
                .instances
                .get(instance_id)
                .map_or(0, |u| u.stored_bytes());
        }
        Ok(Some(total))
    }

    /// The newest sample of an instance; before the scheduler took any, one
    /// is measured and recorded now.
    pub fn current_usage(&self, instance_id: &str) -> ServiceResult<UsageSample> {
        self.engine.catalog().get_instance(instance_id)?;
        if let Some(s) = self.engine.catalog().last_usage_sample(instance_id)? {
            return Ok(s);
        }
        self.record_samples(self.now(), false)?;
        self.engine
            .catalog()
            .last_usage_sample(instance_id)?
            .ok_or_else(|| {
                strata_catalog::CatalogError::InstanceNotFound(instance_id.to_string()).into()
            })
    }

    /// Current figures, samples and billable GB-hours of an instance between
    /// `from` (default: its first sample) and `to` (default and latest: now;
    /// the future is not billed).
    pub fn usage_report(
        &self,
        instance_id: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> ServiceResult<UsageReport> {
        let current = self.current_usage(instance_id)?;
        let now = self.now();
        let to = to.map_or(now, |t| t.min(now));
        let all = self
            .engine
            .catalog()
            .list_usage_samples(instance_id, None, Some(to))?;
        let from = from.or_else(|| all.first().map(|s| s.at)).unwrap_or(to);
        let billable_gb_hours = billable_gb_hours(&all, from, to);
        let samples = all.into_iter().filter(|s| s.at >= from).collect();
        Ok(UsageReport {
            current,
            quota: self.quota_rule(instance_id),
            samples,
            from,
            to,
            billable_gb_hours,
        })
    }
}

#[cfg(test)]
mod tests {
    use strata_catalog::{Catalog, Instance, SqliteCatalog};
    use strata_engine::{Engine, EngineSettings};
    use strata_repo::{LocalStorage, Repository, Storage};

    use super::*;
    use crate::{ManualClock, ServiceSettings};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn quotas_parse_and_apply() {
        assert_eq!(
            FreeQuota::parse("200%"),
            Ok(FreeQuota::PercentOfDatabase(200))
        );
        assert_eq!(FreeQuota::parse("50GiB"), Ok(FreeQuota::Bytes(50 << 30)));
        assert_eq!(FreeQuota::parse(" 3 MiB"), Ok(FreeQuota::Bytes(3 << 20)));
        assert_eq!(FreeQuota::parse("4096"), Ok(FreeQuota::Bytes(4096)));
        for bad in ["", "GiB", "-1%", "5GB", "lots", "99999999999TiB"] {
            assert!(FreeQuota::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(FreeQuota::PercentOfDatabase(200).bytes(1000), 2000);
        assert_eq!(FreeQuota::PercentOfDatabase(50).bytes(1001), 500);
        assert_eq!(FreeQuota::Bytes(7).bytes(1000), 7);
        for q in [
            FreeQuota::Bytes(50 << 30),
            FreeQuota::PercentOfDatabase(150),
        ] {
            assert_eq!(FreeQuota::parse(&q.to_string()), Ok(q));
        }
    }

    fn sample(t: &str, stored: u64, quota: u64) -> UsageSample {
        UsageSample {
            instance_id: "a".into(),
            at: at(t),
            logical_bytes: 0,
            data_bytes: stored,
            wal_bytes: 0,
            quota_bytes: quota,
            cross_region_bytes: Some(stored),
        }
    }

    #[test]
    fn gb_hours_hold_each_sample_until_the_next() {
        let gib = 1u64 << 30;
        let samples = vec![
            sample("2026-11-25T10:00:00Z", 3 * gib, gib), // 2 GiB over for 2 h
            sample("2026-11-25T12:00:00Z", gib, 2 * gib), // within the quota for 1 h
            sample("2026-11-25T13:00:00Z", 5 * gib, gib), // 4 GiB over until the end
        ];
        let h = billable_gb_hours(
            &samples,
            at("2026-11-25T10:00:00Z"),
            at("2026-11-25T13:30:00Z"),
        );
        assert_eq!(h, 2.0 * 2.0 + 4.0 * 0.5);
        // A period starting inside a sample's span counts only its part.
        let h = billable_gb_hours(
            &samples,
            at("2026-11-25T11:30:00Z"),
            at("2026-11-25T12:30:00Z"),
        );
        assert_eq!(h, 1.0);
        // Nothing before the first sample.
        let h = billable_gb_hours(
            &samples,
            at("2026-11-25T08:00:00Z"),
            at("2026-11-25T10:15:00Z"),
        );
        assert_eq!(h, 0.5);
    }

    #[tokio::test]
    async fn the_scheduler_samples_at_its_interval_and_integrates_the_excess() {
        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let repo = Repository::open_or_init(storage.clone()).unwrap();
        let engine = Engine::new(catalog.clone(), repo, EngineSettings::default());
        catalog
            .add_instance(&Instance::new(
                "a",
                "127.0.0.1",
                5432,
                "postgres",
                strata_catalog::SslMode::Prefer,
            ))
            .unwrap();
        let clock = Arc::new(ManualClock::new(at("2026-11-25T10:00:00Z")));
        let mut settings = ServiceSettings {
            instances_dir: dir.path().join("instances"),
            drills: false,
            ..Default::default()
        };
        settings.usage.sample_interval = chrono::Duration::minutes(30);
        settings
            .usage
            .instance_quotas
            .insert("a".into(), FreeQuota::Bytes(1024));
        let svc = Service::new(engine, clock.clone(), settings);

        // 5 KiB of WAL: 4 KiB over the 1 KiB quota.
        storage
            .put(
                "instances/a/wal/00000001/000000010000000000000001",
                &[7; 5120],
            )
            .unwrap();
        assert!(svc.sample_usage_if_due().await.unwrap());
        clock.advance(chrono::Duration::minutes(20));
        assert!(
            !svc.sample_usage_if_due().await.unwrap(),
            "inside the interval"
        );
        clock.advance(chrono::Duration::minutes(10));
        // 9 KiB: 8 KiB over from 10:30.
        storage
            .put(
                "instances/a/wal/00000001/000000010000000000000002",
                &[7; 4096],
            )
            .unwrap();
        assert!(svc.sample_usage_if_due().await.unwrap());
        clock.advance(chrono::Duration::minutes(90));

        let report = svc.usage_report("a", None, None).unwrap();
        assert_eq!(report.samples.len(), 2);
        assert_eq!(report.current.wal_bytes, 9216);
        // No cross-region policy nor copies: nothing in other regions.
        assert_eq!(report.current.cross_region_bytes, Some(0));
        assert_eq!(report.current.excess_bytes(), 8192);
        assert_eq!(
            (report.samples[0].at, report.samples[1].at),
            (at("2026-11-25T10:00:00Z"), at("2026-11-25T10:30:00Z"))
        );
        // 4 KiB × 0.5 h + 8 KiB × 1.5 h = 14 KiB·h = 14 / 2^20 GB-hours.
        assert_eq!(report.billable_gb_hours, 14.0 / (1u64 << 20) as f64);
        let part = svc
            .usage_report(
                "a",
                Some(at("2026-11-25T10:45:00Z")),
                Some(at("2026-11-25T11:45:00Z")),
            )
            .unwrap();
        assert_eq!(part.samples.len(), 0);
        assert_eq!(part.billable_gb_hours, 8.0 / (1u64 << 20) as f64);

        // A change asks for a sample at once.
        svc.usage_changed();
        assert!(svc.sample_usage_if_due().await.unwrap());
        assert_eq!(svc.usage_report("a", None, None).unwrap().samples.len(), 3);
    }
}
