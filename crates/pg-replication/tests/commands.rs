//! Walsender commands against a real PostgreSQL 15: IDENTIFY_SYSTEM, SHOW, slots,
//! TIMELINE_HISTORY and streaming across a timeline switch.

mod common;

use common::{connect_superuser, opts};
use pg_replication::{Lsn, ReplicationClient, ReplicationMessage, TimelineId};
use testkit::{shared_cluster, Cluster};

#[tokio::test]
async fn identify_system_and_show() {
    let cluster = shared_cluster(15);
    let mut client = connect_superuser(cluster).await;
    let id = client.identify_system().await.expect("identify_system");
    let expected: u64 = cluster
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .parse()
        .unwrap();
    assert_eq!(id.system_id, expected);
    assert_eq!(id.timeline, TimelineId(1));
    assert!(id.xlogpos > Lsn(0));
    assert_eq!(id.dbname, None);

    assert_eq!(client.show("wal_level").await.unwrap(), "replica");
    assert_eq!(client.show("wal_segment_size").await.unwrap(), "16MB");
    let rows = client.simple_query("SHOW max_wal_senders").await.unwrap();
    assert_eq!(rows, vec![vec![Some("10".to_string())]]);
    let err = client.show("no_such_setting").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    // The connection survives an error.
    client.identify_system().await.expect("after error");
}

/// An answer larger than the client keeps is refused, not gathered, and the connection is
/// not used again (the rest of the answer is still on it).
#[tokio::test]
async fn answers_past_the_result_limit_are_refused() {
    let cluster = shared_cluster(15);
    let mut plain = opts(cluster, "postgres");
    plain.replication = false;
    plain.dbname = Some("postgres".into());
    let mut client = ReplicationClient::connect(&plain).await.unwrap();
    client.set_max_result_bytes(1 << 20);
    let rows = client
        .simple_query("SELECT repeat('x', 1000) FROM generate_series(1, 500)")
        .await
        .unwrap();
    assert_eq!(rows.len(), 500);
    let err = client
        .simple_query("SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("larger than 1048576 bytes"),
        "{err}"
    );
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.to_string().contains("reconnect"), "{err}");
}

#[tokio::test]
async fn physical_slots() {
    let cluster = shared_cluster(15);
    let mut client = connect_superuser(cluster).await;
    let restart = client
        .create_physical_slot("strata_slot_test", false, true)
        .await
        .expect("create slot")
        .expect("reserved WAL has a restart LSN");
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'strata_slot_test'"
        ),
        restart.to_string()
    );
    let (lsn, tli) = client
        .read_replication_slot("strata_slot_test")
        .await
        .unwrap()
        .expect("slot exists");
    assert_eq!(lsn, Some(restart));
    assert_eq!(tli, Some(TimelineId(1)));

    let dup = client
        .create_physical_slot("strata_slot_test", false, true)
        .await
        .unwrap_err();
    assert_eq!(dup.sqlstate(), Some("42710"), "{dup}");

    client
        .drop_slot("strata_slot_test", true)
        .await
        .expect("drop");
    assert_eq!(
        client
            .read_replication_slot("strata_slot_test")
            .await
            .unwrap(),
        None
    );
    let missing = client
        .drop_slot("strata_slot_test", false)
        .await
        .unwrap_err();
    assert_eq!(missing.sqlstate(), Some("42704"), "{missing}");

    // Without RESERVE_WAL a physical slot has no restart LSN yet.
    assert_eq!(
        client
            .create_physical_slot("strata_lazy_slot", true, false)
            .await
            .unwrap(),
        None
    );
}

const SEGMENT: u64 = 16 * 1024 * 1024;

/// Reads the stream until WAL up to `until` has arrived, checking that XLogData is contiguous.
/// A 1 ms ticker races `next()` in `select!`, so reads are cancelled constantly: contiguity
/// proves that cancellation loses nothing. Returns the position reached.
async fn receive_until(
    stream: &mut pg_replication::ReplicationStream<'_>,
    mut pos: Lsn,
    until: Lsn,
) -> Lsn {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(1));
    let mut ticks = 0u64;
    while pos < until {
        assert!(
            tokio::time::Instant::now() < deadline,
            "WAL did not arrive within 60 s"
        );
        tokio::select! {
            msg = stream.next() => match msg.expect("stream error").expect("stream ended early") {
                ReplicationMessage::XLogData { start, data, .. } => {
                    assert_eq!(start, pos, "XLogData must be contiguous");
                    pos = Lsn(start.0 + data.len() as u64);
                }
                ReplicationMessage::Keepalive { reply_requested, .. } => {
                    if reply_requested {
                        stream.send_status(pos, pos, pos, false).await.unwrap();
                    }
                }
                other => panic!("unexpected {other:?}"),
            },
            _ = ticker.tick() => {
                ticks += 1;
                if ticks == 100 {
                    ticks = 0;
                    stream.send_status(pos, pos, Lsn(0), false).await.unwrap();
                }
            }
        }
    }
    pos
}

#[tokio::test]
async fn stream_wal_from_temporary_slot() {
    let cluster = shared_cluster(15);
    let mut o = opts(cluster, "postgres");
    o.application_name = "strata_stream_test".into();
    let mut client = ReplicationClient::connect(&o).await.unwrap();
    let restart = client
        .create_physical_slot("strata_stream_slot", true, true)
        .await
        .unwrap()
        .expect("restart LSN");
    // Start at the segment boundary, as a WAL archiver does.
    let start = Lsn(restart.0 - restart.0 % SEGMENT);
    let segment_end = Lsn(start.0 + SEGMENT);

    let mut stream = client
        .start_replication(Some("strata_stream_slot"), start, Some(TimelineId(1)))
        .await
        .expect("start_replication");
    cluster.psql(
        "postgres",
        "CREATE TABLE stream_test AS SELECT generate_series(1, 1000) AS x;
         SELECT pg_switch_wal();",
    );
    let pos = receive_until(&mut stream, start, segment_end).await;
    assert!(pos >= segment_end);

    stream.send_status(pos, pos, Lsn(0), false).await.unwrap();
    // The walsender moves the slot to the flushed position it was told about.
    let mut advanced = false;
    for _ in 0..200 {
        let restart_now: Lsn = cluster
            .psql(
                "postgres",
                "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'strata_stream_slot'",
            )
            .parse()
            .unwrap();
        if restart_now >= segment_end {
            advanced = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(advanced, "slot did not advance after the status update");

    stream.stop().await.expect("stop");
    let id = client
        .identify_system()
        .await
        .expect("command mode after stop");
    assert!(id.xlogpos >= segment_end);
    // The temporary slot lives as long as the connection.
    drop(client);
}

#[tokio::test]
async fn timeline_history_and_end_of_timeline() {
    let primary = Cluster::start_default(15);
    primary.psql("postgres", "CREATE TABLE t AS SELECT 1 AS x");
    let standby = primary.create_standby();
    standby.promote();

    let mut client = connect_superuser(&standby).await;
    let id = client.identify_system().await.unwrap();
    assert_eq!(id.timeline, TimelineId(2));
    let (name, content) = client.timeline_history(TimelineId(2)).await.unwrap();
    assert_eq!(name, "00000002.history");
    let text = String::from_utf8(content).unwrap();
    let switch: Lsn = text
        .split('\t')
        .nth(1)
        .unwrap_or_else(|| panic!("history {text:?}"))
        .parse()
        .unwrap();
    assert!(text.starts_with("1\t"), "{text}");

    // Streaming the old timeline stops at the switch point and names the next timeline.
    let start = Lsn(switch.0 - switch.0 % SEGMENT);
    let mut stream = client
        .start_replication(None, start, Some(TimelineId(1)))
        .await
        .expect("start on timeline 1");
    let mut pos = start;
    loop {
        match stream.next().await.expect("stream") {
            Some(ReplicationMessage::XLogData { start, data, .. }) => {
                assert_eq!(start, pos);
                pos = Lsn(start.0 + data.len() as u64);
            }
            Some(ReplicationMessage::Keepalive { .. }) => {}
            Some(ReplicationMessage::EndOfTimeline {
                next_timeline,
                next_start,
            }) => {
                assert_eq!(next_timeline, TimelineId(2));
                assert_eq!(next_start, switch);
                break;
            }
            None => panic!("stream ended without EndOfTimeline"),
        }
    }
    assert_eq!(pos, switch, "all WAL of timeline 1 up to the switch");
    // Once the timeline ended there is nothing to report: nothing is sent.
    stream
        .send_status(pos, pos, Lsn(0), true)
        .await
        .expect("a status update after the end");
    assert!(stream.next().await.unwrap().is_none());
    stream.stop().await.unwrap();
    assert_eq!(
        client.identify_system().await.unwrap().timeline,
        TimelineId(2)
    );
}

/// A walsender terminated mid-stream sends its FATAL error and closes the
/// connection: the stream ends with the server's reason, not the closed
/// socket's, and a status update after it sends nothing and fails nothing.
#[tokio::test]
async fn a_terminated_walsender_ends_the_stream_with_its_reason() {
    let cluster = shared_cluster(15);
    let mut o = opts(cluster, "postgres");
    o.application_name = "strata_terminated_test".into();
    let mut client = ReplicationClient::connect(&o).await.unwrap();
    let id = client.identify_system().await.unwrap();
    let start = Lsn(id.xlogpos.0 - id.xlogpos.0 % SEGMENT);
    let mut stream = client
        .start_replication(None, start, Some(id.timeline))
        .await
        .expect("start_replication");
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication \
                     WHERE application_name = 'strata_terminated_test'";
    let mut terminated = false;
    for _ in 0..200 {
        if cluster.psql("postgres", terminate) == "1" {
            terminated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        terminated,
        "the walsender never showed in pg_stat_replication"
    );
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error"),
                Err(e) => break e,
            }
        }
    })
    .await
    .expect("the stream ends once its walsender is terminated");
    assert_eq!(ended.sqlstate(), Some("57P01"), "{ended}");
    stream
        .send_status(start, start, Lsn(0), false)
        .await
        .expect("a status update after the end");
}

/// Without `replication` the session is an ordinary one: it runs SQL (here
/// a backup started and stopped, as snapshot backups do) and refuses
/// walsender commands.
#[tokio::test]
async fn a_plain_session_runs_sql_not_walsender_commands() {
    let cluster = shared_cluster(15);
    let mut plain = opts(cluster, "postgres");
    plain.replication = false;
    plain.dbname = Some("postgres".into());
    // Its own name: other tests of this binary open plain sessions at the same time.
    plain.application_name = "strata_plain_session_test".into();
    let mut client = ReplicationClient::connect(&plain).await.unwrap();
    let rows = client
        .simple_query("SELECT pg_backup_start('plain session', true)::text")
        .await
        .unwrap();
    let start: Lsn = rows[0][0].as_deref().unwrap().parse().unwrap();
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND application_name = 'strata_plain_session_test'"
        ),
        "1"
    );
    let rows = client
        .simple_query("SELECT lsn::text, labelfile FROM pg_backup_stop(false)")
        .await
        .unwrap();
    let stop: Lsn = rows[0][0].as_deref().unwrap().parse().unwrap();
    assert!(stop >= start);
    let label = rows[0][1].as_deref().unwrap();
    assert!(label.contains("LABEL: plain session"), "{label}");
    assert!(client.identify_system().await.is_err());
}

/// While reads are held below a mark, a commit's few hundred bytes of WAL
/// stay unreported; ending the hold reports them at once, so a receiver
/// that holds reads during a pause loses nothing and waits for no later
/// packet. Its own cluster: another test's WAL would pass the mark.
#[tokio::test]
async fn held_reads_report_what_arrived_when_the_hold_ends() {
    let cluster = Cluster::start_default(15);
    cluster.psql("postgres", "CREATE TABLE held (x int)");
    let mut client = ReplicationClient::connect(&opts(&cluster, "postgres"))
        .await
        .unwrap();
    let id = client.identify_system().await.unwrap();
    let mut stream = client
        .start_replication(None, id.xlogpos, Some(id.timeline))
        .await
        .expect("start_replication");
    let wait = |ms| std::time::Duration::from_millis(ms);
    // Read until nothing more comes (a keepalive, WAL written before the
    // start): the socket is then read dry. The insert's WAL starts at
    // the end of what was read.
    let mut next_start = id.xlogpos;
    while let Ok(msg) = tokio::time::timeout(wait(300), stream.next()).await {
        if let ReplicationMessage::XLogData { start, data, .. } = msg.unwrap().unwrap() {
            next_start = Lsn(start.0 + data.len() as u64);
        }
    }

    stream.hold_reads_below(1 << 20).unwrap();
    cluster.psql("postgres", "INSERT INTO held VALUES (1)");
    let held = tokio::time::timeout(wait(1000), stream.next()).await;
    assert!(held.is_err(), "WAL reported during the hold: {held:?}");

    stream.hold_reads_below(1).unwrap();
    match tokio::time::timeout(wait(10_000), stream.next()).await {
        Ok(Ok(Some(ReplicationMessage::XLogData { start, data, .. }))) => {
            assert_eq!(start, next_start);
            assert!(!data.is_empty());
        }
        other => panic!("the WAL of the insert was not reported after the hold: {other:?}"),
    }
}
