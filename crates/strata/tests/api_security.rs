//! The API's defences as a client with a valid key meets them, against the
//! real `strata serve`: a request runs only the action and parameters its
//! signature covers, `/metrics` can be locked behind a token and moved to a
//! listener of its own, and request input echoed in errors can neither
//! flood an answer nor write a line of its own into the server's log.

mod common;

use std::path::Path;

use chrono::Utc;
use common::{http_request, Server, Strata};

/// `(AccessKeyId, AccessKeySecret)` of the admin key the server created.
fn admin_key(strata: &Strata) -> (String, String) {
    let path = strata.dir.join("data/admin-key.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let field = |n: &str| v[n].as_str().unwrap().to_string();
    (field("AccessKeyId"), field("AccessKeySecret"))
}

fn nonce() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The JSON answer of a request: status, `Code`, `Message`.
fn answer(resp: (u16, String, String)) -> (u16, String, String) {
    let (status, _, body) = resp;
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let field = |n: &str| v[n].as_str().unwrap_or_default().to_string();
    (status, field("Code"), field("Message"))
}

/// A V2-signed POST with `params` in the query string and extra `headers`.
fn send_v2(
    server: &Server,
    key: &(String, String),
    params: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let query = acs_signature::sign_v2("POST", params, &key.0, &key.1, Utc::now(), &nonce());
    answer(http_request(
        server.port,
        "POST",
        &format!("/?{query}"),
        headers,
        b"",
    ))
}

fn backup_ids(strata: &Strata, id: &str) -> Vec<String> {
    let mut ids: Vec<String> = strata
        .backups(id)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// V2 signs no header: an `x-acs-action` header must never pick the action.
/// V3 does not sign the order of repeated names: a repeated parameter is
/// refused, however it is ordered.
#[test]
fn only_signed_actions_and_parameters_run() {
    const ID: &str = "sigcheck";
    let pg = testkit::shared_cluster(15);
    let strata = Strata::with_config("api-signed", "", "[drills]\nenabled = false\n");
    strata.add_instance(ID, pg);
    let older = strata.backup(ID);
    let newer = strata.backup(ID);
    let before = backup_ids(&strata, ID);
    assert_eq!(before.len(), 2, "{before:?}");
    let server = Server::start(&strata, &[]);
    let key = admin_key(&strata);
    let common = [("Version", "2014-08-15"), ("Format", "JSON")];
    let target = [("DBInstanceId", ID), ("BackupId", older.as_str())];
    let delete = [("x-acs-action", "DeleteBackup")];
    // Log backup off, so that DeleteBackup may delete any set but the newest.
    let mut log_off: Vec<_> = common.to_vec();
    log_off.extend([
        ("Action", "ModifyBackupPolicy"),
        ("DBInstanceId", ID),
        ("BackupPolicyMode", "LogBackupPolicy"),
        ("EnableBackupLog", "False"),
    ]);
    let (status, code, message) = send_v2(&server, &key, &log_off, &[]);
    assert_eq!((status, code.as_str()), (200, ""), "{message}");

    // (a) Signed as a DescribeBackups call without `Action`; the unsigned
    // header asks for DeleteBackup.
    let params: Vec<_> = common.iter().chain(&target).copied().collect();
    let (status, code, message) = send_v2(&server, &key, &params, &delete);
    assert_eq!(
        (status, code.as_str()),
        (400, "IncompleteSignature"),
        "{message}"
    );
    assert!(message.contains("x-acs-action"), "{message}");
    assert_eq!(backup_ids(&strata, ID), before, "nothing may be deleted");

    // The same with a signed `Action`: the header may not override it either.
    let mut with_action = params.clone();
    with_action.push(("Action", "DescribeBackups"));
    let (status, code, message) = send_v2(&server, &key, &with_action, &delete);
    assert_eq!(
        (status, code.as_str()),
        (400, "InvalidParameter"),
        "{message}"
    );
    assert_eq!(backup_ids(&strata, ID), before);
    // ... and with a header that agrees, the signed call runs.
    let agree = [("x-acs-action", "DescribeBackups")];
    let (status, code, message) = send_v2(&server, &key, &with_action, &agree);
    assert_eq!((status, code.as_str()), (200, ""), "{message}");

    // (b) V3: DeleteBackup signed with BackupId twice, the older id last
    // after reordering (the canonical query sorts them, so the signature
    // still matches).
    let signed_query = format!("BackupId={older}&BackupId={newer}&DBInstanceId={ID}");
    let sent_query = format!("BackupId={newer}&BackupId={older}&DBInstanceId={ID}");
    let host = format!("127.0.0.1:{}", server.port);
    let headers: Vec<(String, String)> = [
        ("host", host.as_str()),
        ("x-acs-action", "DeleteBackup"),
        ("x-acs-version", "2014-08-15"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let req = acs_signature::RequestParts {
        method: "POST",
        path: "/",
        raw_query: &signed_query,
        headers: &headers,
        body: b"",
    };
    let added = acs_signature::sign_v3(&req, &key.0, &key.1, Utc::now(), &nonce()).unwrap();
    let all: Vec<(&str, &str)> = headers
        .iter()
        .chain(&added)
        .filter(|(k, _)| k != "host")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (status, code, message) = answer(http_request(
        server.port,
        "POST",
        &format!("/?{sent_query}"),
        &all,
        b"",
    ));
    assert_eq!(
        (status, code.as_str()),
        (400, "InvalidParameter"),
        "{message}"
    );
    assert!(message.contains("BackupId"), "{message}");
    assert_eq!(backup_ids(&strata, ID), before, "nothing may be deleted");

    // What the refused requests were after works when it is what was signed.
    let mut signed_delete = params.clone();
    signed_delete.push(("Action", "DeleteBackup"));
    let (status, code, message) = send_v2(&server, &key, &signed_delete, &delete);
    assert_eq!((status, code.as_str()), (200, ""), "{message}");
    assert_eq!(backup_ids(&strata, ID), vec![newer.clone()]);
}

fn metrics_text(port: u16, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (status, _, body) = http_request(port, "GET", "/metrics", &headers, b"");
    (status, body)
}

#[test]
fn metrics_token_is_required_when_configured() {
    let strata = Strata::with_config("metrics-token", "", "[metrics]\ntoken = \"tok-5f2a9c\"\n");
    let server = Server::start(&strata, &[]);
    assert_eq!(metrics_text(server.port, None).0, 401);
    assert_eq!(metrics_text(server.port, Some("tok-5f2a9")).0, 401);
    assert_eq!(metrics_text(server.port, Some("tok-5f2a9cc")).0, 401);
    let (status, text) = metrics_text(server.port, Some("tok-5f2a9c"));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("strata_uptime_seconds"), "{text}");
    // The API itself is unchanged.
    assert_eq!(
        common::http_get(server.port, "/healthz").0,
        "HTTP/1.1 200 OK"
    );
}

#[test]
fn metrics_on_their_own_listener() {
    let strata = Strata::new("metrics-listen");
    let token_file = strata.dir.join("metrics-token");
    std::fs::write(&token_file, "tok-from-file\n").unwrap();
    let metrics_port = testkit::free_port();
    append_config(
        &strata.config,
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\ntoken_file = {:?}\n",
            common::path_str(&token_file)
        ),
    );
    let server = Server::start(&strata, &[]);
    common::wait_for("the metrics listener", 30, || {
        testkit::listening(metrics_port)
    });
    // Not on the API's address any more, with or without the token.
    assert_eq!(metrics_text(server.port, None).0, 404);
    assert_eq!(metrics_text(server.port, Some("tok-from-file")).0, 404);
    assert_eq!(
        common::http_get(server.port, "/healthz").0,
        "HTTP/1.1 200 OK"
    );
    // On its own address, behind the token; nothing else is served there.
    assert_eq!(metrics_text(metrics_port, None).0, 401);
    let (status, text) = metrics_text(metrics_port, Some("tok-from-file"));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("strata_uptime_seconds"), "{text}");
    assert_eq!(
        http_request(metrics_port, "GET", "/healthz", &[], b"").0,
        404
    );
    assert_eq!(http_request(metrics_port, "POST", "/", &[], b"").0, 404);
}

fn append_config(config: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(config)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Input with CR/LF and 10 000 more characters, echoed by two errors (an
/// unknown instance id, an unknown action): each answer's message is short
/// and on one line, and the log gains no line of the client's making.
#[test]
fn echoed_input_is_cut_and_escaped() {
    let strata = Strata::new("echo");
    let server = Server::start_env(&strata, &[], &[("STRATA_LOG", "info")]);
    let key = admin_key(&strata);
    let hostile = format!("x\r\nFAKE LOG LINE {}", "a".repeat(10_000));
    let cases = [
        (
            vec![
                ("Action", "DescribeBackups"),
                ("DBInstanceId", hostile.as_str()),
            ],
            404,
            "InvalidDBInstance.NotFound",
        ),
        (
            vec![("Action", hostile.as_str())],
            404,
            "InvalidAction.NotFound",
        ),
        (
            vec![
                ("Action", "DescribeDBInstances"),
                ("PageSize", hostile.as_str()),
            ],
            400,
            "InvalidPageSize.Malformed",
        ),
    ];
    for (extra, want_status, want_code) in cases {
        let mut params = vec![("Version", "2014-08-15"), ("Format", "JSON")];
        params.extend(extra);
        let (status, code, message) = send_v2(&server, &key, &params, &[]);
        assert_eq!(
            (status, code.as_str()),
            (want_status, want_code),
            "{message}"
        );
        let start: String = message.chars().take(300).collect();
        assert!(!message.contains(['\r', '\n']), "raw CR/LF in {start:?}…");
        assert!(
            message.chars().count() <= 1025,
            "{} chars",
            message.chars().count()
        );
    }
    let (_, _, log) = server.stop();
    assert!(
        log.contains("x\\r\\nFAKE LOG LINE aaa"),
        "the refusals were not logged:\n{}",
        &log[..log.len().min(2000)]
    );
    let forged: Vec<&str> = log.lines().filter(|l| l.starts_with("FAKE")).collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
}
