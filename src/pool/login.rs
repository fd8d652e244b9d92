//! A client's login in the pooled modes: bulkhead checks its password itself, borrows a
//! server connection of its (user, database) pool with its settings applied, and answers the
//! startup as a server would (AuthenticationOk, the parameters, a cancel key, ReadyForQuery).

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::LendError;
use super::lending::Lending;
use crate::Shared;
use crate::auth::client::{authenticate, binding_for, write_authentication};
use crate::cancel::Target;
use crate::config::Config;
use crate::errors::Refusal;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::startup;
use crate::tls::Stream;

/// What a pooled login leaves for the relay.
pub struct LoggedIn {
    pub lending: Lending,
    /// The key the client was given (its backend's pid, bulkhead's secret).
    pub client_key: (i32, [u8; 4]),
    /// What the client sent after its last login message, for the relay.
    pub leftover: BytesMut,
}

/// Why a pooled login failed: bulkhead's refusal, or the server's own error to pass on.
pub enum Failed {
    Refused(Refusal),
    Server(BytesMut),
}

impl From<Refusal> for Failed {
    fn from(r: Refusal) -> Self {
        Failed::Refused(r)
    }
}

/// The settings a startup packet asks for: every parameter but the ones that name the
/// login, with `options` (`-c name=value`, `--name=value`) taken apart. An error names what
/// cannot be pooled.
fn settings(params: &startup::Params<'_>) -> Result<Vec<(String, String)>, Refusal> {
    let mut out = Vec::new();
    let mut put = |name: &str, value: &str| match out
        .iter_mut()
        .find(|(n, _): &&mut (String, String)| n == name)
    {
        Some(p) => p.1 = value.to_string(),
        None => out.push((name.to_string(), value.to_string())),
    };
    for (name, value) in params.iter() {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return Err(Refusal::ClientProtocol(
                "a startup parameter is not UTF-8".into(),
            ));
        };
        match name {
            "user" | "database" => {}
            "replication" if !matches!(value, "false" | "off" | "no" | "0") => {
                return Err(Refusal::NotPoolable(
                    "0A000",
                    "replication connections cannot be pooled; connect to the server directly"
                        .into(),
                ));
            }
            "replication" => {}
            "options" => {
                let mut words = value.split_whitespace();
                while let Some(word) = words.next() {
                    let setting = if word == "-c" {
                        words.next()
                    } else {
                        word.strip_prefix("-c").or_else(|| word.strip_prefix("--"))
                    };
                    let Some((n, v)) = setting.and_then(|s| s.split_once('=')) else {
                        return Err(Refusal::NotPoolable(
                            "0A000",
                            format!(
                                "startup option {word:?} cannot be pooled; only -c name=value and --name=value can"
                            ),
                        ));
                    };
                    put(&n.replace('-', "_"), v);
                }
            }
            // Protocol extensions bulkhead does not take: answered in NegotiateProtocolVersion.
            n if n.starts_with("_pq_.") => {}
            n => put(n, value),
        }
    }
    Ok(out)
}

/// Logs the client in, borrows a server connection and answers the startup. `packet` is the
/// client's StartupMessage.
pub(crate) async fn log_in(
    shared: &std::sync::Arc<Shared>,
    config: &Config,
    client: &mut Stream,
    packet: &[u8],
    readonly: bool,
) -> Result<LoggedIn, Failed> {
    let Ok(Some((startup::Startup::Start { minor, params }, _))) = startup::parse(packet) else {
        return Err(Refusal::ClientProtocol("invalid startup packet".into()).into());
    };
    let Some(user) = params.get("user").filter(|u| !u.is_empty()) else {
        return Err(Refusal::NotPoolable(
            "28000",
            "no PostgreSQL user name specified in startup packet".into(),
        )
        .into());
    };
    let database = params
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user);
    let mut wanted = settings(&params)?;
    if readonly {
        // On a standby writes fail anyway; on the primary (no standby qualifies) this makes
        // them fail the same way, with PostgreSQL's own 25006.
        wanted.retain(|(n, _)| n != "default_transaction_read_only");
        wanted.push(("default_transaction_read_only".into(), "on".into()));
    }
    let secret = if !config.auth.file.is_empty() {
        shared.users().get(user).cloned()
    } else {
        match shared.auth_query.lookup(shared, config, user).await {
            Ok(secret) => secret,
            Err(why) => {
                warn!(%why, "auth query failed");
                return Err(Refusal::NoServer(why).into());
            }
        }
    };
    let binding = binding_for(client.is_tls(), &shared.tls.get());
    let mut incoming = BytesMut::with_capacity(512);
    let credential = std::sync::Arc::new(
        authenticate(
            client,
            &mut incoming,
            user,
            secret.as_ref(),
            &shared.mock_key,
            binding,
        )
        .await?,
    );
    debug!(user, database, "client authenticated");
    let pool = shared.pools.get(shared, user, database, readonly);
    let until = Instant::now() + config.limits.queue_timeout;
    let lent = match pool.lend(shared, config, &credential, &wanted, until).await {
        Ok(lent) => lent,
        Err(LendError::Refused(r)) => return Err(r.into()),
        Err(LendError::Server(e)) => return Err(Failed::Server(e)),
    };
    let conn = lent.conn();
    let target = Target {
        addr: conn.info.addr,
        pid: conn.info.pid,
        key: conn.info.secret.clone(),
    };
    let per_transaction = config.pool.mode == crate::config::PoolMode::Transaction;
    // Session pooling: the client is on this backend for its whole connection and is told its
    // real pid. Transaction pooling: on whichever backend its transaction gets, so the pid it
    // is told is a number of bulkhead's own, as PgBouncer's is.
    let client_pid = if per_transaction {
        let mut raw = [0u8; 4];
        getrandom::fill(&mut raw).expect("the system's random source works");
        (i32::from_be_bytes(raw) & 0x3fff_ffff).max(1)
    } else {
        conn.info.pid
    };
    let (secret, cancel) = shared.cancels.register_slot(client_pid, Some(target));
    let mut out = BytesMut::with_capacity(512);
    let extensions: Vec<&[u8]> = params
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with(b"_pq_."))
        .collect();
    if minor > 0 || !extensions.is_empty() {
        // NegotiateProtocolVersion: bulkhead speaks 3.0 and none of the extensions.
        let len = 4 + 4 + 4 + extensions.iter().map(|e| e.len() + 1).sum::<usize>();
        out.put_u8(b'v');
        out.put_u32(len as u32);
        out.put_u32(0);
        out.put_u32(extensions.len() as u32);
        for e in &extensions {
            out.put_slice(e);
            out.put_u8(0);
        }
    }
    write_authentication(&mut out, 0, &[]);
    for (name, value) in &conn.info.params {
        out.put_u8(backend::PARAMETER_STATUS_TAG);
        out.put_u32((4 + name.len() + 1 + value.len() + 1) as u32);
        out.put_slice(name.as_bytes());
        out.put_u8(0);
        out.put_slice(value.as_bytes());
        out.put_u8(0);
    }
    backend::write_backend_key_data(&mut out, client_pid, &secret);
    backend::write_ready_for_query(&mut out, TxStatus::Idle);
    if let Err(e) = client.write_all(&out).await {
        shared.cancels.remove(client_pid, secret);
        return Err(Refusal::ClientProtocol(format!("connection ended during login: {e}")).into());
    }
    let primary = shared
        .topology
        .watch_primary()
        .borrow()
        .as_ref()
        .map(|p| p.index);
    Ok(LoggedIn {
        lending: Lending::new(
            shared.clone(),
            pool,
            credential,
            wanted,
            per_transaction,
            lent,
            cancel,
            primary,
            *shared.topology.watch_readers().borrow(),
        ),
        client_key: (client_pid, secret),
        leftover: incoming,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in pairs {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&196_608u32.to_be_bytes());
        packet.extend_from_slice(&body);
        packet
    }

    fn settings_of(pairs: &[(&str, &str)]) -> Result<Vec<(String, String)>, Refusal> {
        let packet = params(pairs);
        let Ok(Some((startup::Startup::Start { params, .. }, _))) = startup::parse(&packet) else {
            panic!("valid packet");
        };
        settings(&params)
    }

    #[test]
    fn startup_parameters_become_settings_and_options_are_taken_apart() {
        let s = settings_of(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "app"),
            (
                "options",
                "-c search_path=a,b --statement-timeout=5s -cwork_mem=64kB",
            ),
            ("_pq_.x", "1"),
        ])
        .unwrap();
        let s: Vec<(&str, &str)> = s.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            s,
            [
                ("application_name", "app"),
                ("search_path", "a,b"),
                ("statement_timeout", "5s"),
                ("work_mem", "64kB"),
            ]
        );
        assert!(matches!(
            settings_of(&[("user", "u"), ("replication", "database")]),
            Err(Refusal::NotPoolable("0A000", _))
        ));
        assert!(settings_of(&[("user", "u"), ("options", "-x")]).is_err());
    }
}
