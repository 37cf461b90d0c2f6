//! A real Azure Blob Storage emulator for tests: Azurite (npm `azurite`,
//! installed into `.cache/azurite` by `scripts/install-test-deps.sh`), its
//! blob service on a free loopback port, data kept in memory only. It serves
//! the well-known development account `devstoreaccount1`. Stopped on drop.
//!
//! `object_store` cannot create containers, so [`Azurite::create_container`]
//! sends the Create Container request itself, signed with Shared Key
//! (Azure Storage REST reference, "Authorize with Shared Key").

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::emulator::{http_exchange, start_on_free_port};
use crate::{keep_test_dirs, workspace_root};

/// The `azurite-blob` launcher: env `STRATA_AZURITE_BLOB`, else
/// `<workspace>/.cache/azurite/node_modules/.bin/azurite-blob`.
pub fn azurite_blob_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_AZURITE_BLOB") {
        return PathBuf::from(path);
    }
    workspace_root().join(".cache/azurite/node_modules/.bin/azurite-blob")
}

/// A running Azurite blob service.
pub struct Azurite {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Azurite {
    /// The emulator's account (public, the same in every Azurite).
    pub const ACCOUNT: &'static str = "devstoreaccount1";
    /// The emulator's account key (public, the same in every Azurite).
    pub const ACCOUNT_KEY: &'static str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    /// The container [`Azurite::start`] creates.
    pub const CONTAINER: &'static str = "strata-test";

    /// Starts the blob service with one empty container, [`Azurite::CONTAINER`].
    pub fn start() -> Azurite {
        let binary = azurite_blob_binary();
        assert!(
            binary.exists(),
            "{} not found; run scripts/install-test-deps.sh (or set STRATA_AZURITE_BLOB)",
            binary.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("strata-azurite-")
            .tempdir_in("/tmp")
            .expect("create azurite temp dir")
            .keep();
        let started = start_on_free_port("azurite", &dir, Duration::from_secs(30), |port| {
            let mut command = Command::new(&binary);
            command
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .args(["--inMemoryPersistence", "--silent", "--skipApiVersionCheck"])
                // Its debug log and lock files land in the working directory.
                .current_dir(&dir);
            command
        });
        let azurite = Azurite {
            child: started.child,
            dir,
            port: started.port,
        };
        azurite.create_container(Self::CONTAINER);
        azurite
    }

    /// `http://127.0.0.1:PORT`: the emulator's base URL (the account is the
    /// first path segment below it).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The blob service's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates an empty container (Create Container, `PUT ?restype=container`).
    pub fn create_container(&self, name: &str) {
        let date = http_date(SystemTime::now());
        let version = "2021-08-06";
        let resource = format!("/{0}/{0}/{name}\nrestype:container", Self::ACCOUNT);
        // VERB, eleven standard headers (all empty), canonical x-ms- headers, resource.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}"
        );
        let key = STANDARD.decode(Self::ACCOUNT_KEY).expect("base64 key");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("any key length");
        mac.update(to_sign.as_bytes());
        let signature = STANDARD.encode(mac.finalize().into_bytes());
        let request = format!(
            "PUT /{account}/{name}?restype=container HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\n\
             x-ms-date: {date}\r\n\
             x-ms-version: {version}\r\n\
             Authorization: SharedKey {account}:{signature}\r\n\
             Content-Length: 0\r\n\
             Connection: close\r\n\r\n",
            account = Self::ACCOUNT,
            port = self.port,
        );
        let answer = http_exchange(self.port, &request);
        let status = answer.lines().next().unwrap_or_default();
        assert!(
            status.starts_with("HTTP/1.1 201"),
            "creating container {name}: {answer}"
        );
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !keep_test_dirs() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `Sun, 06 Dec 2026 20:10:54 GMT` (RFC 7231 IMF-fixdate).
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let days = (secs / 86_400) as i64;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (H. Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_imf_fixdates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_588_454);
        assert_eq!(http_date(t), "Sun, 06 Dec 2026 20:20:54 GMT");
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(leap), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
