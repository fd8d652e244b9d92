//! Topology from Patroni (`[database] discovery = "patroni"`).
//!
//! Every `patroni_interval` (from a random phase), `GET /cluster` from one of
//! the configured Patroni REST APIs: the one that answered last, else the others in turn
//! (each instance starts at a random one, so a fleet spreads over them). While Patroni
//! answers, only the member it calls the leader may be the primary, and only once bulkhead's
//! own probe finds that host writable: writes follow a switchover the moment Patroni reports
//! it (the new leader's probe is asked to look at once) and never go to a host Patroni no
//! longer calls the leader, whatever that host says of itself. When no API answers, the
//! probe's own rules decide again (the highest timeline, the fencing), and /health says so.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::debug;

use super::phase;
use super::topology::PatroniMember;
use crate::Shared;

/// The largest /cluster answer read: a few hundred bytes per member.
const MAX_BODY: usize = 1 << 20;

/// A Patroni REST API: `http://host:port`, and a path prefix if it sits behind one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    authority: String,
    prefix: String,
}

impl Endpoint {
    /// Parses `http://host:port[/prefix]`.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = match url.strip_prefix("http://") {
            Some(rest) => rest,
            None if url.starts_with("https://") => {
                return Err("https is not supported: use Patroni's plain http API".into());
            }
            None => return Err("must start with http://".into()),
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let port = authority
            .rsplit_once(':')
            .map(|(_, p)| p)
            .ok_or("needs a port (Patroni's REST API listens on 8008 by default)")?;
        port.parse::<u16>()
            .map_err(|_| format!("bad port {port:?}"))?;
        Ok(Endpoint {
            authority: authority.to_string(),
            prefix: prefix.to_string(),
        })
    }

    fn url(&self) -> String {
        format!("http://{}{}/cluster", self.authority, self.prefix)
    }
}

/// One member as Patroni's /cluster lists it.
#[derive(Debug, Deserialize)]
struct Member {
    name: String,
    role: String,
    #[serde(default)]
    state: Option<String>,
    host: String,
    port: u16,
    #[serde(default)]
    timeline: Option<i64>,
    /// Bytes behind the leader, or "unknown".
    #[serde(default)]
    lag: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Cluster {
    members: Vec<Member>,
}

/// Reads /cluster from `endpoint` within `within`.
async fn read_cluster(endpoint: &Endpoint, within: Duration) -> Result<Vec<Member>, String> {
    let path = format!("{}/cluster", endpoint.prefix);
    let read = crate::http_get::get(&endpoint.authority, &path, within, MAX_BODY)
        .await
        .and_then(|(status, body)| {
            if !status.is_success() {
                return Err(format!("HTTP {status}"));
            }
            serde_json::from_slice::<Cluster>(&body)
                .map(|c| c.members)
                .map_err(|e| format!("not a Patroni /cluster answer: {e}"))
        });
    read.map_err(|why| format!("{}: {why}", endpoint.url()))
}

/// Follows Patroni until aborted.
pub(crate) async fn follow(shared: Arc<Shared>) {
    let config = shared.live.get();
    let endpoints: Vec<Endpoint> = config
        .database
        .patroni
        .iter()
        .filter_map(|url| Endpoint::parse(url).ok())
        .collect();
    if endpoints.is_empty() {
        return;
    }
    let every = config.database.patroni_interval;
    // Each read may take up to the probe's timeout per API before the next is tried.
    let within = config.probe.timeout;
    let mut first = (phase(Duration::from_secs(1)).as_micros() as usize) % endpoints.len();
    // The first read at once; the next at a random point of the first interval.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + phase(every), every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut errors = Vec::new();
        let mut found = None;
        for k in 0..endpoints.len() {
            let i = (first + k) % endpoints.len();
            match read_cluster(&endpoints[i], within).await {
                Ok(members) => {
                    found = Some((i, members));
                    break;
                }
                Err(why) => {
                    debug!(%why, "Patroni API did not answer");
                    errors.push(why);
                }
            }
        }
        match found {
            Some((i, members)) => {
                first = i;
                let members = members
                    .into_iter()
                    .map(|m| PatroniMember {
                        address: format!("{}:{}", m.host, m.port),
                        name: m.name,
                        role: m.role,
                        state: m.state.unwrap_or_default(),
                        timeline: m.timeline,
                        lag: m.lag.and_then(|l| l.as_i64()),
                    })
                    .collect();
                shared.topology.patroni_seen(members, endpoints[i].url());
            }
            None => shared.topology.patroni_unreachable(errors.join("; ")),
        }
        ticks.tick().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_plain_http_with_a_port() {
        assert_eq!(
            Endpoint::parse("http://10.0.0.1:8008").unwrap().url(),
            "http://10.0.0.1:8008/cluster"
        );
        assert_eq!(
            Endpoint::parse("http://patroni:8008/pg/").unwrap().url(),
            "http://patroni:8008/pg/cluster"
        );
        assert!(
            Endpoint::parse("https://a:8008")
                .unwrap_err()
                .contains("https")
        );
        assert!(Endpoint::parse("a:8008").unwrap_err().contains("http://"));
        assert!(Endpoint::parse("http://a").unwrap_err().contains("port"));
        assert!(
            Endpoint::parse("http://a:x")
                .unwrap_err()
                .contains("bad port")
        );
    }

    #[test]
    fn a_cluster_answer_is_read_as_patroni_3_writes_it() {
        let body = br#"{"members": [{"name": "pg1", "role": "leader", "state": "running", "api_url": "http://127.0.0.1:8008/patroni", "host": "127.0.0.1", "port": 5440, "timeline": 1}, {"name": "pg2", "role": "replica", "state": "streaming", "host": "127.0.0.1", "port": 5441, "timeline": 1, "lag": 0}], "scope": "bh"}"#;
        let c: Cluster = serde_json::from_slice(body).unwrap();
        assert_eq!(c.members.len(), 2);
        assert_eq!(c.members[0].role, "leader");
        assert_eq!(c.members[1].lag.as_ref().and_then(|l| l.as_i64()), Some(0));
    }
}
