//! The RDS error envelope: an HTTP status and `{"RequestId", "HostId",
//! "Code", "Message"}`, with RDS's codes wherever RDS has one.

use acs_signature::SignatureError;
use axum::http::StatusCode;
use strata_catalog::CatalogError;
use strata_engine::EngineError;
use strata_service::{PolicyError, ServiceError};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn bad(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

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
                format!("The specified instance {id} is not found."),
            ),
            CatalogError::InstanceExists(id) => ApiError::bad(
                "InvalidDBInstanceId.Duplicate",
                format!("An instance with id {id} is already registered."),
            ),
            CatalogError::BackupNotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidBackupSetID.NotFound",
                format!("The specified backup set {id} is not found."),
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
    tracing::error!("internal error: {e}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        format!("The request processing has failed due to some unknown error: {e}"),
    )
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
            other => internal(&other),
        }
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        let status = if e.code.starts_with("Incorrect") {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, e.code, e.message)
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
            SignatureError::TimestampFormat(_) => ApiError::bad("InvalidTimeStamp.Format", e.to_string()),
            SignatureError::TimestampExpired => ApiError::bad(
                "InvalidTimeStamp.Expired",
                "Specified time stamp or date value is expired: it must be within 15 minutes of the server's clock.",
            ),
        }
    }
}
