//! What a real PostgreSQL never sends, from a scripted server (`support::fake`): each broken
//! answer reaches the client as a defined error, garbage inside well-framed messages passes
//! through, and bulkhead goes on serving everyone else.

use std::time::Duration;

use tokio::time::Instant;

use bulkhead::Config;
use bulkhead::probe::Role;

use crate::support::fake::FakeServer;
use crate::support::raw::{Raw, field, msg, startup_packet};
use crate::support::{Proxy, eventually};

const READ: Duration = Duration::from_millis(300);
const GRACE: Duration = Duration::from_millis(300);

async fn setup() -> (FakeServer, Proxy) {
    let fake = FakeServer::start().await;
    let mut config = Config::default();
    config.database.hosts = vec![fake.addr.to_string()];
    config.probe.interval = Duration::from_millis(200);
    config.timeouts.read = READ;
    config.timeouts.cancel_grace = GRACE;
    let proxy = Proxy::start(config).await;
    eventually(
        "the probe to take the fake for a primary",
        Duration::from_secs(10),
        || async { (proxy.bulkhead.topology().hosts()[0].role == Role::Primary).then_some(()) },
    )
    .await;
    (fake, proxy)
}

/// Logs in (with `application_name`, which picks a login script), sends `queries` one after
/// another, each once the one before was answered, and returns every whole message received
/// until the connection closed or a ReadyForQuery answered the last query, with the connection.
async fn exchange_on(proxy: &Proxy, app: &str, queries: &[&str]) -> (Vec<(u8, Vec<u8>)>, Raw) {
    let mut r = Raw::connect(proxy.addr).await;
    let params = [
        ("user", "postgres"),
        ("database", "postgres"),
        ("application_name", app),
    ];
    r.send(&startup_packet(0, &params)).await;
    let mut seen = vec![];
    let mut queries = queries.iter();
    while let Some(m) = r.recv().await {
        let ready = m.0 == b'Z';
        seen.push(m);
        if ready {
            match queries.next() {
                Some(q) => r.send(&msg(b'Q', format!("{q}\0").as_bytes())).await,
                None => break,
            }
        }
    }
    (seen, r)
}

/// [`exchange_on`] with at most one query, when the connection is of no further use.
async fn exchange(proxy: &Proxy, app: &str, query: Option<&str>) -> Vec<(u8, Vec<u8>)> {
    exchange_on(proxy, app, query.as_slice()).await.0
}

/// The `case:ok` row arrived: the session (or a new one) is served as usual.
fn assert_answered(seen: &[(u8, Vec<u8>)]) {
    assert!(
        seen.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"ok")),
        "{seen:?}"
    );
}

/// The last message must be a FATAL with `code` whose text contains `says`.
fn assert_fatal(case: &str, seen: &[(u8, Vec<u8>)], code: &str, says: &str) {
    let Some((b'E', body)) = seen.last() else {
        panic!("{case}: no error at the end: {seen:?}");
    };
    let text = String::from_utf8_lossy(body);
    assert_eq!(
        field(body, b'V').as_deref(),
        Some("FATAL"),
        "{case}: {text}"
    );
    assert_eq!(field(body, b'C').as_deref(), Some(code), "{case}: {text}");
    assert!(
        field(body, b'M').unwrap_or_default().contains(says),
        "{case}: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_answers_end_the_session_with_fatal_08006_naming_what_was_wrong() {
    let (_fake, proxy) = setup().await;
    for (case, says) in [
        ("rfq-empty", "invalid ReadyForQuery from server"),
        ("rfq-bad-status", "invalid ReadyForQuery from server"),
        ("length-under-four", "invalid message from server"),
        ("length-too-large", "invalid message from server"),
        ("close-between-messages", "the server closed the connection"),
    ] {
        let seen = exchange(&proxy, "test", Some(&format!("SELECT 'case:{case}'"))).await;
        assert_fatal(case, &seen, "08006", says);
    }
    let seen = exchange(&proxy, "test", Some("SELECT 'case:ok'")).await;
    assert_answered(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_inside_well_framed_messages_passes_through_and_the_session_goes_on() {
    let (_fake, proxy) = setup().await;
    let mut r = Raw::connect(proxy.addr).await;
    r.login("postgres").await;
    r.send(&msg(b'Q', b"SELECT 'case:error-garbage'\0")).await;
    let seen = r.recv_until(b'Z').await;
    assert_eq!(
        seen[0],
        (b'E', b"\xffno terminator".to_vec()),
        "as the server sent it"
    );
    r.send(&msg(b'Q', b"SELECT 'case:notice-garbage'\0")).await;
    let seen = r.recv_until(b'Z').await;
    assert_eq!(seen[0], (b'N', b"S".to_vec()));
    r.send(&msg(b'Q', b"SELECT 'case:ok'\0")).await;
    let seen = r.recv_until(b'Z').await;
    assert_answered(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dying_mid_message_closes_the_client_connection_without_a_made_up_ending() {
    let (_fake, proxy) = setup().await;
    let mut r = Raw::connect(proxy.addr).await;
    r.login("postgres").await;
    r.send(&msg(b'Q', b"SELECT 'case:close-mid-message'\0"))
        .await;
    let started = Instant::now();
    // Part of a DataRow has gone out; nothing the client could parse can follow it, so no
    // error is appended and no row is padded out: the connection just closes.
    let first = r.recv().await;
    assert!(first.is_none(), "no whole message arrives: {first:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_never_answers_and_ignores_the_cancel_gets_fatal_57014_in_bounded_time() {
    let (_fake, proxy) = setup().await;
    let started = Instant::now();
    let seen = exchange(&proxy, "test", Some("SELECT 'case:silent'")).await;
    let took = started.elapsed();
    assert_fatal("silent", &seen, "57014", "did not answer the cancel");
    assert!(
        took < READ + GRACE + Duration::from_secs(1),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_logins_from_the_server_get_a_fatal_error_not_a_silent_close() {
    let (_fake, proxy) = setup().await;
    for (case, code, says) in [
        (
            "short-key-data",
            "08006",
            "invalid BackendKeyData from server",
        ),
        ("close-at-login", "08006", "closed"),
        ("auth-garbage", "08006", "closed"),
    ] {
        let seen = exchange(&proxy, &format!("case:{case}"), None).await;
        assert_fatal(case, &seen, code, says);
    }
    let seen = exchange(&proxy, "test", Some("SELECT 'case:ok'")).await;
    assert_answered(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_server_connections_hint_says_what_became_of_the_clients_work() {
    let (_fake, proxy) = setup().await;
    for (queries, hint) in [
        (&["SELECT 'case:close-between-messages'"][..], "Reconnect."),
        (
            &["INSERT INTO t VALUES ('case:close-between-messages')"],
            "Reconnect. The write in progress may or may not have been committed.",
        ),
        (
            // A read inside a transaction may be a COMMIT of writes no classifier can see.
            &[
                "SELECT 'case:begin'",
                "SELECT 'case:close-between-messages'",
            ],
            "Reconnect. The write in progress may or may not have been committed.",
        ),
        (
            &["SELECT 'case:begin-then-close'"],
            "Reconnect. The open transaction did not commit; run it again.",
        ),
    ] {
        let (mut seen, mut r) = exchange_on(&proxy, "test", queries).await;
        while let Some(m) = r.recv().await {
            seen.push(m); // the close may come after the last answer
        }
        assert_fatal(
            queries[0],
            &seen,
            "08006",
            "the server closed the connection",
        );
        let body = &seen.last().unwrap().1;
        assert_eq!(field(body, b'H').as_deref(), Some(hint), "{queries:?}");
    }
}
