//! A client of a key management service (KMS) speaking the AWS KMS API:
//! JSON over HTTP POST, the operation in `X-Amz-Target: TrentService.<Op>`,
//! requests signed with AWS Signature Version 4 (the `aws-sigv4` crate).
//! Strata uses it for envelope encryption: a customer master key (CMK) held
//! by the KMS wraps each encrypted instance's data key
//! (`GenerateDataKey`, `Decrypt`, `ReEncrypt`), and `DescribeKey` tells
//! whether the CMK is usable. Reference: the AWS KMS API Reference
//! (docs.aws.amazon.com/kms/latest/APIReference), "Common Errors".
//!
//! Every failure is a [`KmsError`] whose variant says what the caller can do:
//! a disabled or deleted key is not a network error.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;
use zeroize::Zeroizing;

/// Longest key id, ARN or alias the KMS API accepts.
pub const MAX_KEY_ID_LEN: usize = 2048;

/// Where the KMS is and who Strata is to it.
#[derive(Clone)]
pub struct KmsConfig {
    /// `http(s)://host[:port]` of the KMS API.
    pub endpoint: String,
    /// Region the requests are signed for.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key (never printed).
    pub secret_access_key: Zeroizing<String>,
}

impl std::fmt::Debug for KmsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .finish()
    }
}

/// Why a KMS call failed.
#[derive(Debug, Error)]
pub enum KmsError {
    /// The CMK is disabled (`DisabledException`) or pending deletion
    /// (`KMSInvalidStateException`).
    #[error("KMS key {key} is not usable: {message}")]
    KeyDisabled {
        /// The key as asked for.
        key: String,
        /// The KMS's words.
        message: String,
    },
    /// No such CMK (`NotFoundException`).
    #[error("KMS key {0} does not exist")]
    KeyNotFound(String),
    /// Strata's credentials may not use the key (`AccessDeniedException`,
    /// bad signature or unknown access key).
    #[error("the KMS refused Strata's credentials: {0}")]
    AccessDenied(String),
    /// The wrapped key is not one this KMS made under that key and context.
    #[error("the KMS cannot decrypt the wrapped data key: {0}")]
    InvalidCiphertext(String),
    /// The KMS cannot be reached or failed (network, 5xx, throttling).
    #[error("the KMS at {endpoint} is unavailable: {message}")]
    Unavailable {
        /// The endpoint called.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// Another refusal, with the KMS's error type.
    #[error("the KMS refused {operation}: {kind}: {message}")]
    Refused {
        /// The operation called.
        operation: String,
        /// The KMS's `__type`.
        kind: String,
        /// The KMS's words.
        message: String,
    },
    /// The request cannot be made (bad key id, bad configuration).
    #[error("{0}")]
    Invalid(String),
}

/// What a KMS call returns.
pub type KmsResult<T> = Result<T, KmsError>;

/// True for what a key id, key ARN or alias may look like: 1 to
/// [`MAX_KEY_ID_LEN`] characters of `A-Z a-z 0-9 : / _ - .` (no quotes,
/// spaces or control characters reach a request or a log line).
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":/_-.".contains(&b))
}

/// A new data key: its plaintext (for this process only) and the KMS's
/// ciphertext of it (to store).
pub struct DataKey {
    /// 32 bytes, zeroed on drop.
    pub plaintext: Zeroizing<[u8; 32]>,
    /// The wrapped key, opaque.
    pub ciphertext: Vec<u8>,
    /// The CMK's ARN as the KMS answered it.
    pub key_id: String,
}

/// What `DescribeKey` says about a CMK.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyMetadata {
    /// Key id (a UUID).
    pub key_id: String,
    /// Key ARN.
    #[serde(default)]
    pub arn: Option<String>,
    /// Whether the key may be used.
    #[serde(default)]
    pub enabled: bool,
    /// `Enabled`, `Disabled`, `PendingDeletion`, …
    #[serde(default)]
    pub key_state: Option<String>,
    /// `ENCRYPT_DECRYPT`, …
    #[serde(default)]
    pub key_usage: Option<String>,
    /// `AWS_KMS`, `EXTERNAL`, …
    #[serde(default)]
    pub origin: Option<String>,
    /// Description given at creation.
    #[serde(default)]
    pub description: Option<String>,
    /// Seconds since the epoch.
    #[serde(default)]
    pub creation_date: Option<f64>,
    /// When a key pending deletion is deleted (seconds since the epoch).
    #[serde(default)]
    pub deletion_date: Option<f64>,
    /// When imported key material expires (seconds since the epoch).
    #[serde(default)]
    pub valid_to: Option<f64>,
    /// Account that owns the key.
    #[serde(default, rename = "AWSAccountId")]
    pub aws_account_id: Option<String>,
    /// `CUSTOMER` or `AWS`.
    #[serde(default)]
    pub key_manager: Option<String>,
}

/// A KMS client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Kms {
    config: KmsConfig,
    http: reqwest::Client,
}

/// Bound on one KMS request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on a KMS answer's body.
const MAX_RESPONSE: usize = 1 << 20;

impl Kms {
    /// A client for `config`; refuses an endpoint that is not http(s).
    pub fn new(config: KmsConfig) -> KmsResult<Kms> {
        let url = reqwest::Url::parse(&config.endpoint)
            .map_err(|e| KmsError::Invalid(format!("KMS endpoint: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(KmsError::Invalid(
                "KMS endpoint must be an http:// or https:// URL with a host".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config()?)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| KmsError::Invalid(format!("KMS client: {e}")))?;
        Ok(Kms { config, http })
    }

    /// The configured endpoint.
    pub fn endpoint(&self) -> &str {
        &self.config.endpoint
    }

    /// The configured region.
    pub fn region(&self) -> &str {
        &self.config.region
    }

    /// A new 256-bit data key under CMK `key_id`, bound to `context`.
    pub async fn generate_data_key(
        &self,
        key_id: &str,
        context: &[(&str, &str)],
    ) -> KmsResult<DataKey> {
        check_key_id(key_id)?;
        let answer = self
            .call(
                "GenerateDataKey",
                key_id,
                json!({"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context_map(context)}),
            )
            .await?;
        let plaintext = Zeroizing::new(blob(&answer, "Plaintext")?);
        Ok(DataKey {
            plaintext: thirty_two(&plaintext)?,
            ciphertext: blob(&answer, "CiphertextBlob")?,
            key_id: answered_key_id(&answer)?,
        })
    }

    /// Unwraps a data key made by [`Kms::generate_data_key`] under CMK `key_id`.
    pub async fn decrypt(
        &self,
        key_id: &str,
        ciphertext: &[u8],
        context: &[(&str, &str)],
    ) -> KmsResult<Zeroizing<[u8; 32]>> {
        check_key_id(key_id)?;
        let answer = self
            .call(
                "Decrypt",
                key_id,
                json!({"KeyId": key_id, "CiphertextBlob": b64(ciphertext), "EncryptionContext": context_map(context)}),
            )
            .await?;
        let plaintext = Zeroizing::new(blob(&answer, "Plaintext")?);
        thirty_two(&plaintext)
    }

    /// The data key re-wrapped under `to_key_id` (the CMK's current key
    /// material when it is the same CMK); the plaintext never leaves the KMS.
    /// Returns the new ciphertext and the destination key's ARN.
    pub async fn re_encrypt(
        &self,
        from_key_id: &str,
        ciphertext: &[u8],
        to_key_id: &str,
        context: &[(&str, &str)],
    ) -> KmsResult<(Vec<u8>, String)> {
        check_key_id(from_key_id)?;
        check_key_id(to_key_id)?;
        let ctx = context_map(context);
        let answer = self
            .call(
                "ReEncrypt",
                to_key_id,
                json!({"SourceKeyId": from_key_id, "DestinationKeyId": to_key_id,
                       "CiphertextBlob": b64(ciphertext),
                       "SourceEncryptionContext": ctx, "DestinationEncryptionContext": ctx}),
            )
            .await?;
        Ok((blob(&answer, "CiphertextBlob")?, answered_key_id(&answer)?))
    }

    /// What the KMS says about CMK `key_id`.
    pub async fn describe_key(&self, key_id: &str) -> KmsResult<KeyMetadata> {
        check_key_id(key_id)?;
        let answer = self
            .call("DescribeKey", key_id, json!({"KeyId": key_id}))
            .await?;
        serde_json::from_value(answer.get("KeyMetadata").cloned().unwrap_or(Value::Null)).map_err(
            |e| KmsError::Unavailable {
                endpoint: self.config.endpoint.clone(),
                message: format!("DescribeKey answer: {e}"),
            },
        )
    }

    /// Whether Strata's credentials are accepted at all (`ListKeys`, one key).
    pub async fn check_credentials(&self) -> KmsResult<()> {
        self.call("ListKeys", "", json!({"Limit": 1}))
            .await
            .map(|_| ())
    }

    async fn call(&self, operation: &str, key: &str, body: Value) -> KmsResult<Value> {
        let body = serde_json::to_vec(&body).map_err(|e| KmsError::Invalid(e.to_string()))?;
        let unavailable = |message: String| KmsError::Unavailable {
            endpoint: self.config.endpoint.clone(),
            message,
        };
        let target = format!("TrentService.{operation}");
        let headers = self.sign(&target, &body)?;
        let mut request = self
            .http
            .post(&self.config.endpoint)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", &target)
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(format!("{operation}: {e}")))?;
        let status = response.status();
        // Read a piece at a time and stop past the limit: an endpoint streaming without end
        // must not fill memory before the size is known.
        let too_large = || {
            unavailable(format!(
                "{operation}: answer larger than {MAX_RESPONSE} bytes"
            ))
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE as u64)
        {
            return Err(too_large());
        }
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| unavailable(format!("{operation}: {e}")))?
        {
            if bytes.len() + chunk.len() > MAX_RESPONSE {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(answer);
        }
        // What the endpoint says reaches API answers, logs and job rows: one bounded line.
        let kind = printable(
            answer
                .get("__type")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .rsplit('#')
                .next()
                .unwrap_or(""),
            128,
        );
        let message = printable(
            answer
                .get("message")
                .or_else(|| answer.get("Message"))
                .and_then(|v| v.as_str())
                .unwrap_or(""),
            300,
        );
        let key = key.to_string();
        Err(match kind.as_str() {
            "DisabledException" | "KMSInvalidStateException" => {
                KmsError::KeyDisabled { key, message }
            }
            "NotFoundException" => KmsError::KeyNotFound(key),
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "MissingAuthenticationToken" => KmsError::AccessDenied(format!("{kind}: {message}")),
            "InvalidCiphertextException" | "IncorrectKeyException" => {
                KmsError::InvalidCiphertext(format!("{kind}: {message}"))
            }
            _ if status.is_server_error() || status.as_u16() == 429 || kind.is_empty() => {
                unavailable(format!("{operation}: HTTP {status} {kind} {message}"))
            }
            _ => KmsError::Refused {
                operation: operation.to_string(),
                kind,
                message,
            },
        })
    }

    /// The SigV4 headers of one request.
    fn sign(&self, target: &str, body: &[u8]) -> KmsResult<Vec<(String, String)>> {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        let invalid = |e: &dyn std::fmt::Display| KmsError::Invalid(format!("signing: {e}"));
        let identity = aws_credential_types::Credentials::new(
            self.config.access_key_id.clone(),
            self.config.secret_access_key.to_string(),
            None,
            None,
            "strata-config",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.config.region)
            .name("kms")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| invalid(&e))?
            .into();
        let unsigned = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target),
        ];
        let signable = SignableRequest::new(
            "POST",
            &self.config.endpoint,
            unsigned.into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| invalid(&e))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| invalid(&e))?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// rustls on ring (like the rest of the workspace) with the system's roots.
fn tls_config() -> KmsResult<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| KmsError::Invalid(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

fn check_key_id(id: &str) -> KmsResult<()> {
    if valid_key_id(id) {
        Ok(())
    } else {
        Err(KmsError::Invalid(
            "a KMS key id is 1 to 2048 characters of letters, digits and : / _ - .".into(),
        ))
    }
}

fn context_map(context: &[(&str, &str)]) -> Value {
    Value::Object(
        context
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `text` without control characters, cut to `max` characters.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// A key id the KMS answered, checked as one given to it is: it is stored and sent back.
fn answered_key_id(answer: &Value) -> KmsResult<String> {
    let id = text(answer, "KeyId")?;
    if valid_key_id(&id) {
        Ok(id)
    } else {
        Err(malformed("KeyId"))
    }
}

fn malformed(field: &str) -> KmsError {
    KmsError::Unavailable {
        endpoint: String::new(),
        message: format!("the KMS answer has no valid {field}"),
    }
}

fn text(answer: &Value, field: &str) -> KmsResult<String> {
    answer
        .get(field)
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| malformed(field))
}

fn blob(answer: &Value, field: &str) -> KmsResult<Vec<u8>> {
    let s = answer
        .get(field)
        .and_then(|v| v.as_str())
        .ok_or_else(|| malformed(field))?;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| malformed(field))
}

fn thirty_two(bytes: &[u8]) -> KmsResult<Zeroizing<[u8; 32]>> {
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| malformed("32-byte Plaintext"))?;
    Ok(Zeroizing::new(key))
}

/// Seconds since the epoch (as `DescribeKey` answers them) as a UTC time.
pub fn epoch_time(secs: f64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(secs as i64, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake KMS answering every request with `answer` (status line, headers, body) after
    /// reading the request; with `endless`, a body that never ends follows the headers.
    async fn fake_kms(answer: String, endless: bool) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let _ = stream.read(&mut buf).await;
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    while endless && stream.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        format!("http://{addr}")
    }

    fn kms_at(endpoint: String) -> Kms {
        Kms::new(KmsConfig {
            endpoint,
            region: "us-east-1".into(),
            access_key_id: "AKID".into(),
            secret_access_key: Zeroizing::new("secret".into()),
        })
        .unwrap()
    }

    /// What a hostile or broken endpoint answers is bounded and checked: a body without end
    /// is refused past 1 MiB, a key id the KMS makes up is not taken, and its error text
    /// reaches nobody with control characters or at any length.
    #[tokio::test]
    async fn answers_of_a_hostile_endpoint_are_bounded_and_checked() {
        let endless = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n".to_string();
        let kms = kms_at(fake_kms(endless, true).await);
        let err = kms.describe_key("alias/strata").await.unwrap_err();
        assert!(
            err.to_string().contains("answer larger than 1048576 bytes"),
            "{err}"
        );

        let json = |body: &str, status: &str| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let plaintext = "A".repeat(43) + "=";
        let made_up =
            format!(r#"{{"Plaintext":"{plaintext}","CiphertextBlob":"AAAA","KeyId":"a b\nc"}}"#);
        let kms = kms_at(fake_kms(json(&made_up, "200 OK"), false).await);
        let err = match kms.generate_data_key("alias/strata", &[]).await {
            Ok(_) => panic!("a made-up key id was taken"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("no valid KeyId"), "{err}");

        let noisy = format!(
            r#"{{"__type":"{}","message":"line one\r\nline two"}}"#,
            "X".repeat(5000)
        );
        let kms = kms_at(fake_kms(json(&noisy, "400 Bad Request"), false).await);
        let err = kms
            .describe_key("alias/strata")
            .await
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n') && !err.contains('\r'), "{err}");
        assert!(err.contains("line oneline two"), "{err}");
        assert!(err.len() < 1000, "{} bytes", err.len());
    }

    #[test]
    fn key_ids_are_checked_and_the_secret_never_printed() {
        assert!(valid_key_id("1234abcd-12ab-34cd-56ef-1234567890ab"));
        assert!(valid_key_id(
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        ));
        assert!(valid_key_id("alias/strata-backups"));
        for bad in [
            "",
            "a\"b",
            "a\nb",
            "a b",
            "k'ey",
            &"k".repeat(MAX_KEY_ID_LEN + 1),
        ] {
            assert!(!valid_key_id(bad), "{bad:?}");
        }
        let config = KmsConfig {
            endpoint: "http://127.0.0.1:1".into(),
            region: "us-east-1".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Zeroizing::new("very-secret-key".into()),
        };
        let kms = Kms::new(config.clone()).unwrap();
        assert!(!format!("{kms:?}").contains("very-secret"));
        assert!(!format!("{config:?}").contains("very-secret"));
        let mut bad = config;
        bad.endpoint = "file:///etc/passwd".into();
        assert!(Kms::new(bad).is_err());
    }

    #[test]
    fn requests_are_signed_for_kms() {
        let kms = Kms::new(KmsConfig {
            endpoint: "http://127.0.0.1:1".into(),
            region: "eu-west-1".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Zeroizing::new("s".into()),
        })
        .unwrap();
        let headers = kms.sign("TrentService.DescribeKey", b"{}").unwrap();
        let auth = headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone())
            .unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{auth}"
        );
        assert!(auth.contains("/eu-west-1/kms/aws4_request"), "{auth}");
        assert!(auth.contains("x-amz-target"), "{auth}");
    }
}
