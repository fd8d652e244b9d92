//! The auth query: a user's secret looked up on the primary by a dedicated login, as
//! PgBouncer's auth_query does, for setups that keep no users file. One connection is kept
//! and reused; it is opened again after an error or when the primary moves.

use std::time::Duration;

use tokio_postgres::NoTls;

use super::Secret;
use crate::Shared;
use crate::config::Config;
use crate::upstream;

#[derive(Default)]
pub struct AuthQuery {
    /// The kept connection and the host it is on.
    conn: tokio::sync::Mutex<Option<(tokio_postgres::Client, usize)>>,
}

impl AuthQuery {
    /// The secret of `user`, `None` if the query returns no row or an empty secret. An error
    /// says why the lookup could not be made.
    pub(crate) async fn lookup(
        &self,
        shared: &Shared,
        config: &Config,
        user: &str,
    ) -> Result<Option<Secret>, String> {
        let within = config.database.connect_timeout + Duration::from_secs(5);
        let mut kept = self.conn.lock().await;
        // Wait for a primary as a new session would (a failover, or bulkhead just started).
        let mut watch = shared.topology.watch_primary();
        let hold = config.circuit.hold_new_connections;
        let found = tokio::time::timeout(hold, async {
            watch
                .wait_for(|p| p.is_some())
                .await
                .ok()
                .and_then(|p| p.clone())
        })
        .await;
        let Ok(Some(primary)) = found else {
            return Err("no primary is known to run the auth query on".into());
        };
        if kept
            .as_ref()
            .is_some_and(|(c, host)| c.is_closed() || *host != primary.index)
        {
            *kept = None;
        }
        if kept.is_none() {
            let (stream, _) = upstream::connect(&primary.address, within, &shared.tls.get())
                .await
                .map_err(|e| format!("auth query: {e}"))?;
            let mut params = tokio_postgres::Config::new();
            params
                .user(&config.auth.user)
                .dbname(&config.auth.database)
                .application_name("bulkhead auth query");
            if !config.auth.password_env.is_empty() {
                let password = std::env::var(&config.auth.password_env).map_err(|_| {
                    format!(
                        "auth.password_env names {}, which is not set",
                        config.auth.password_env
                    )
                })?;
                params.password(password);
            }
            let (client, connection) =
                tokio::time::timeout(within, params.connect_raw(stream, NoTls))
                    .await
                    .map_err(|_| "auth query: the login took too long".to_string())?
                    .map_err(|e| format!("auth query: {e}"))?;
            tokio::spawn(connection);
            *kept = Some((client, primary.index));
        }
        let (client, _) = kept.as_ref().expect("set above");
        let rows =
            match tokio::time::timeout(within, client.query(&config.auth.query, &[&user])).await {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    *kept = None;
                    return Err(format!("auth query: {e}"));
                }
                Err(_) => {
                    *kept = None;
                    return Err("auth query: no answer in time".into());
                }
            };
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let secret: Option<String> = row
            .try_get(1)
            .map_err(|e| format!("auth query: its second column must be the secret (text): {e}"))?;
        Ok(secret.as_deref().and_then(Secret::parse))
    }
}
