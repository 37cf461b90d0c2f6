//! The RDS error envelope: an HTTP status and `{"RequestId", "HostId",
//! "Code", "Message"}`, with RDS's codes wherever RDS has one.
//!
//! Messages repeat what the caller sent (a parameter value, an action name, an
//! id) and are both answered and logged, so every message passes through
//! [`ApiError::new`], which escapes control characters and bounds its length:
//! no request can write a line of its own into the log or make a message
//! carry its megabytes back. Sites that quote input use [`quoted`] or
//! [`shown`], which cut each piece at [`MAX_ECHO`] characters.

use acs_signature::SignatureError;
use axum::http::StatusCode;
use strata_catalog::CatalogError;
use strata_engine::EngineError;
use strata_service::{PolicyError, Refusal, ServiceError};

/// Longest piece of request input a message repeats, in characters.
pub const MAX_ECHO: usize = 200;

/// Longest message, in characters (the longest fixed text is the list of
/// supported actions, well below this).
pub const MAX_MESSAGE: usize = 1024;

/// Request input as a message repeats it: control characters, quotes and
/// backslashes escaped as Rust's `{:?}` does, cut after `MAX_ECHO`
/// characters with `…`, unquoted.
pub fn shown(input: &str) -> String {
    let (part, more) = cut(input);
    let debug = format!("{part:?}");
    // `{:?}` of a str always starts and ends with an ASCII `"`.
    format!("{}{more}", &debug[1..debug.len() - 1])
}

/// Like [`shown`], in double quotes: the `{:?}` of short input.
pub fn quoted(input: &str) -> String {
    let (part, more) = cut(input);
    format!("{part:?}{more}")
}

/// The first [`MAX_ECHO`] characters of `input`, and `…` when there were more.
fn cut(input: &str) -> (&str, &'static str) {
    match input.char_indices().nth(MAX_ECHO) {
        Some((end, _)) => (&input[..end], "…"),
        None => (input, ""),
    }
}

/// A message as it may be answered and logged: control characters escaped
/// (CR as `\r`, LF as `\n`, others as `\u{…}`), cut after [`MAX_MESSAGE`]
/// characters with `…`.
fn bounded(message: String) -> String {
    let clean = |c: char| !c.is_control();
    if message.chars().all(clean) && message.chars().nth(MAX_MESSAGE).is_none() {
        return message;
    }
    let mut out = String::with_capacity(MAX_MESSAGE + 8);
    let mut len = 0;
    for c in message.chars() {
        let piece: String = if clean(c) {
            c.to_string()
        } else {
            c.escape_debug().collect()
        };
        len += piece.chars().count();
        if len > MAX_MESSAGE {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// An error answer: HTTP status, RDS error code, message.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The RDS error code (`Code`).
    pub code: String,
    /// The message (`Message`), escaped and bounded.
    pub message: String,
}

/// What an action returns.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// `message` is escaped and bounded (see the module's notes).
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: bounded(code.to_string()),
            message: bounded(message.into()),
        }
    }

    /// A 400 answer.
    pub fn bad(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 400 `MissingParameter` answer naming `param`.
    pub fn missing(param: &str) -> Self {
        Self::bad(
            "MissingParameter",
            format!("The input parameter \"{param}\" that is mandatory for processing this request is not supplied."),
        )
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match &e {
            CatalogError::InstanceNotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidDBInstance.NotFound",
                format!("The specified instance {} is not found.", shown(id)),
            ),
            CatalogError::InstanceExists(id) => ApiError::bad(
                "InvalidDBInstanceId.Duplicate",
                format!("An instance with id {} is already registered.", shown(id)),
            ),
            CatalogError::BackupNotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidBackupSetID.NotFound",
                format!("The specified backup set {} is not found.", shown(id)),
            ),
            CatalogError::JobNotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidBackupJobId.NotFound",
                format!("The specified backup job {id} is not found."),
            ),
            _ => internal(&e),
        }
    }
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    let error = ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        format!("The request processing has failed due to some unknown error: {e}"),
    );
    // The bounded, escaped text: an internal error may quote a name from the request.
    tracing::error!("internal error: {}", error.message);
    error
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Catalog(c) => c.into(),
            EngineError::Conflict(m) => {
                ApiError::new(StatusCode::FORBIDDEN, "IncorrectDBInstanceState", m)
            }
            EngineError::Unreachable(m) => ApiError::bad("Strata.ServerUnreachable", m),
            EngineError::Server(m) => ApiError::bad("Strata.ServerRefused", m),
            EngineError::Refused(m) => ApiError::bad("InvalidParameter", m),
            EngineError::Kms(k) => kms_error(&k),
            EngineError::DomainLocked { ref locked, .. } => {
                let code = kms_error(&locked.error);
                ApiError::new(code.status, &code.code, e.to_string())
            }
            other => internal(&other),
        }
    }
}

/// The answer to a KMS failure: what is wrong with the key, in RDS's style.
fn kms_error(e: &strata_engine::strata_kms::KmsError) -> ApiError {
    use strata_engine::strata_kms::KmsError as K;
    let (status, code) = match e {
        K::KeyDisabled { .. } => (StatusCode::FORBIDDEN, "InvalidKmsKey.Disabled"),
        K::KeyNotFound(_) => (StatusCode::NOT_FOUND, "InvalidKmsKey.NotFound"),
        K::AccessDenied(_) => (StatusCode::FORBIDDEN, "InvalidKmsKey.NotAuthorized"),
        K::InvalidCiphertext(_) => (StatusCode::FORBIDDEN, "InvalidKmsKey.Mismatch"),
        K::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "Strata.KmsUnavailable"),
        K::Refused { .. } => (StatusCode::BAD_REQUEST, "InvalidKmsKey.Refused"),
        K::Invalid(_) => (StatusCode::BAD_REQUEST, "InvalidEncryptionKey.Malformed"),
    };
    ApiError::new(status, code, e.to_string())
}

/// RDS's error code for a policy refusal.
pub fn refusal_code(kind: Refusal) -> &'static str {
    match kind {
        Refusal::BackupDaysMalformed => "InvalidPreferredBackupPeriod.Malformed",
        Refusal::BackupWindowMalformed => "InvalidPreferredBackupTime.Malformed",
        Refusal::DataRetentionMalformed => "InvalidBackupRetentionPeriod.Malformed",
        Refusal::LogRetentionMalformed => "InvalidLogBackupRetentionPeriod.Malformed",
        Refusal::ConflictingParameters => "InvalidParameterCombination",
        Refusal::MissingParameter => "MissingParameter",
        Refusal::CopyRetentionMalformed => "InvalidRetention.Malformed",
        Refusal::UnknownRegion => "InvalidCrossBackupRegion.NotFound",
        Refusal::CopyNotFound => "InvalidBackupSetID.NotFound",
        Refusal::NoLogBackup => "InvalidRestoreTime.NoLogBackup",
        Refusal::RestoreTimeOutsideWindow => "InvalidRestoreTime",
        Refusal::BackupSetKept => "IncorrectBackupSetState",
        Refusal::NotCreatedByStrata => "IncorrectDBInstanceType",
        Refusal::TableMetaMalformed => "InvalidTableMeta.Malformed",
        Refusal::DbNamesMalformed => "InvalidDbNames.Malformed",
        Refusal::DatabaseNameFormat => "InvalidDBName.Format",
        Refusal::DatabaseNameTaken => "InvalidDBName.Duplicate",
        Refusal::DatabaseNotFound => "InvalidDBName.NotFound",
        Refusal::TableNameFormat => "InvalidTableName.Format",
        Refusal::TableNameTaken => "InvalidTableName.Duplicate",
        Refusal::TableNotFound => "InvalidTableName.NotFound",
        Refusal::SnapshotNeedsAgent => "InvalidBackupMethod.NotSupported",
        Refusal::BackupIntervalMalformed => "InvalidBackupInterval.Malformed",
        Refusal::BackupIntervalNeedsSnapshot => "InvalidBackupInterval.NotSupported",
        Refusal::AdvancedPolicyMalformed => "InvalidAdvancedDataPolicies.Malformed",
        Refusal::ArchivePolicyMalformed => "InvalidArchiveBackupPolicy.Malformed",
        Refusal::KeepLastMalformed => "InvalidKeepLast.Malformed",
        Refusal::KeepMalformed => "InvalidKeepUntil.Malformed",
        Refusal::ExpireTimeTooEarly => "InvalidExpectExpireTime",
        Refusal::BackupSetNotSuccessful => "IncorrectBackupSetState",
        Refusal::NoContents => "IncorrectBackupSetState",
        Refusal::ImportDisabled => "Strata.ImportDisabled",
        Refusal::ImportFileMalformed => "InvalidBackupFile.Malformed",
        Refusal::ImportFileNotFound => "InvalidBackupFile.NotFound",
        Refusal::UserBackupNotFound => "InvalidBackupId.NotFound",
        Refusal::CommentMalformed => "InvalidComment.Malformed",
        Refusal::UserBackupRetentionMalformed => "InvalidRetention.Malformed",
        Refusal::EngineVersionMalformed => "InvalidEngineVersion.Malformed",
    }
}

/// The HTTP status of a policy refusal: RDS answers a request that the
/// resource's state forbids ("Incorrect…") with 403, a malformed one with 400.
pub fn refusal_status(kind: Refusal) -> StatusCode {
    match kind {
        Refusal::BackupSetKept
        | Refusal::NotCreatedByStrata
        | Refusal::BackupSetNotSuccessful
        | Refusal::NoContents
        | Refusal::ImportDisabled => StatusCode::FORBIDDEN,
        Refusal::UserBackupNotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        ApiError::new(refusal_status(e.kind), refusal_code(e.kind), e.message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Engine(e) => e.into(),
            ServiceError::Policy(p) => p.into(),
        }
    }
}

impl From<SignatureError> for ApiError {
    fn from(e: SignatureError) -> Self {
        match &e {
            SignatureError::Unsigned => ApiError::bad(
                "IncompleteSignature",
                "The request is not signed: send an ACS3-HMAC-SHA256 Authorization header or the V2 HMAC-SHA1 Signature parameters.",
            ),
            SignatureError::Malformed(_) | SignatureError::HeaderNotSigned(_) => {
                ApiError::bad("IncompleteSignature", e.to_string())
            }
            SignatureError::UnsupportedAlgorithm(_) => {
                ApiError::bad("InvalidSignatureMethod", e.to_string())
            }
            SignatureError::Mismatch | SignatureError::BodyHashMismatch => ApiError::bad(
                "SignatureDoesNotMatch",
                format!("Specified signature does not match our calculation ({e})."),
            ),
            SignatureError::DuplicateParameter(name) => ApiError::bad(
                "InvalidParameter",
                format!("The parameter {name} is given more than once; send each parameter once."),
            ),
            SignatureError::Conflict { .. } => ApiError::bad("InvalidParameter", e.to_string()),
            SignatureError::TimestampFormat(_) => ApiError::bad("InvalidTimeStamp.Format", e.to_string()),
            SignatureError::TimestampExpired => ApiError::bad(
                "InvalidTimeStamp.Expired",
                "Specified time stamp or date value is expired: it must be within 15 minutes of the server's clock.",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_cut_and_escaped() {
        assert_eq!(shown("pg-1"), "pg-1");
        assert_eq!(quoted("pg-1"), "\"pg-1\"");
        assert_eq!(
            shown("a\r\nFAKE \"x\"\u{1b}[31m"),
            "a\\r\\nFAKE \\\"x\\\"\\u{1b}[31m"
        );
        let long = format!("é{}", "x".repeat(10_000));
        let cut = shown(&long);
        assert_eq!(cut.chars().count(), MAX_ECHO + 1, "{cut}");
        assert!(cut.starts_with("éxx") && cut.ends_with("x…"));
        assert_eq!(quoted(&long).chars().count(), MAX_ECHO + 3);
        assert_eq!(shown(&"y".repeat(MAX_ECHO)), "y".repeat(MAX_ECHO));
    }

    #[test]
    fn every_message_is_one_bounded_line() {
        let e = ApiError::bad(
            "X",
            format!("got {}\r\nFAKE LOG LINE{}", "a", "b".repeat(10_000)),
        );
        assert!(!e.message.contains(['\r', '\n']), "{}", &e.message[..80]);
        assert!(e.message.starts_with("got a\\r\\nFAKE LOG LINEbbb"));
        assert!(e.message.chars().count() <= MAX_MESSAGE + 1);
        assert!(e.message.chars().count() > MAX_MESSAGE - 4);
        assert!(e.message.ends_with('…'));
        let e = ApiError::bad("X", "short and clean");
        assert_eq!(e.message, "short and clean");
        let e: ApiError =
            CatalogError::InstanceNotFound(format!("x\nFAKE{}", "z".repeat(500))).into();
        assert!(
            e.message.starts_with("The specified instance x\\nFAKEzz"),
            "{}",
            e.message
        );
        assert!(e.message.len() < 300, "{}", e.message);
    }

    /// Every refusal keeps the code and status clients saw when the service
    /// named them itself (the SDK and CLI tests match on these codes).
    #[test]
    fn refusals_keep_their_rds_codes() {
        let cases = [
            (
                Refusal::BackupDaysMalformed,
                "InvalidPreferredBackupPeriod.Malformed",
            ),
            (
                Refusal::BackupWindowMalformed,
                "InvalidPreferredBackupTime.Malformed",
            ),
            (
                Refusal::DataRetentionMalformed,
                "InvalidBackupRetentionPeriod.Malformed",
            ),
            (
                Refusal::LogRetentionMalformed,
                "InvalidLogBackupRetentionPeriod.Malformed",
            ),
            (
                Refusal::ConflictingParameters,
                "InvalidParameterCombination",
            ),
            (Refusal::MissingParameter, "MissingParameter"),
            (
                Refusal::CopyRetentionMalformed,
                "InvalidRetention.Malformed",
            ),
            (Refusal::UnknownRegion, "InvalidCrossBackupRegion.NotFound"),
            (Refusal::CopyNotFound, "InvalidBackupSetID.NotFound"),
            (Refusal::NoLogBackup, "InvalidRestoreTime.NoLogBackup"),
            (Refusal::RestoreTimeOutsideWindow, "InvalidRestoreTime"),
            (Refusal::BackupSetKept, "IncorrectBackupSetState"),
            (Refusal::NotCreatedByStrata, "IncorrectDBInstanceType"),
            (Refusal::TableMetaMalformed, "InvalidTableMeta.Malformed"),
            (Refusal::DbNamesMalformed, "InvalidDbNames.Malformed"),
            (Refusal::DatabaseNameFormat, "InvalidDBName.Format"),
            (Refusal::DatabaseNameTaken, "InvalidDBName.Duplicate"),
            (Refusal::DatabaseNotFound, "InvalidDBName.NotFound"),
            (Refusal::TableNameFormat, "InvalidTableName.Format"),
            (Refusal::TableNameTaken, "InvalidTableName.Duplicate"),
            (Refusal::TableNotFound, "InvalidTableName.NotFound"),
            (
                Refusal::SnapshotNeedsAgent,
                "InvalidBackupMethod.NotSupported",
            ),
            (
                Refusal::BackupIntervalMalformed,
                "InvalidBackupInterval.Malformed",
            ),
            (
                Refusal::BackupIntervalNeedsSnapshot,
                "InvalidBackupInterval.NotSupported",
            ),
            (
                Refusal::AdvancedPolicyMalformed,
                "InvalidAdvancedDataPolicies.Malformed",
            ),
            (
                Refusal::ArchivePolicyMalformed,
                "InvalidArchiveBackupPolicy.Malformed",
            ),
            (Refusal::KeepLastMalformed, "InvalidKeepLast.Malformed"),
            (Refusal::KeepMalformed, "InvalidKeepUntil.Malformed"),
            (Refusal::ExpireTimeTooEarly, "InvalidExpectExpireTime"),
            (Refusal::BackupSetNotSuccessful, "IncorrectBackupSetState"),
            (Refusal::NoContents, "IncorrectBackupSetState"),
        ];
        for (kind, code) in cases {
            let e = ApiError::from(PolicyError {
                kind,
                message: "why".into(),
            });
            assert_eq!(e.code, code, "{kind:?}");
            assert_eq!(e.message, "why");
            let forbidden = code.starts_with("Incorrect");
            assert_eq!(e.status == StatusCode::FORBIDDEN, forbidden, "{kind:?}");
            assert_eq!(e.status == StatusCode::BAD_REQUEST, !forbidden, "{kind:?}");
        }
    }
}
