//! Configuration: the TOML schema of DESIGN.md §4, parsed with serde into structs whose
//! durations are already `Duration`s, then checked as a whole. Every key has a default, so an
//! empty file is valid; an unknown key or a bad value is an error that names the key and line.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A validated configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub listen_readonly: ListenReadonly,
    pub health: Health,
    pub database: Database,
    pub probe: Probe,
    pub timeouts: Timeouts,
    pub circuit: Circuit,
    pub limits: Limits,
    pub pool: Pool,
    pub auth: Auth,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Where applications connect.
    pub address: SocketAddr,
    /// Whether clients may, must or must not use TLS. Needs the two files below.
    pub tls: ListenTls,
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

/// A second listener for reads only (issue 21): sessions go to a standby whose replay lag is
/// under `max_replica_lag`, or to the primary, read-only, when none qualifies. TLS as on
/// [listen].
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenReadonly {
    /// Where read-only clients connect; absent: no such listener.
    pub address: Option<SocketAddr>,
    /// A standby further behind than this takes no new read-only sessions.
    #[serde(deserialize_with = "duration")]
    pub max_replica_lag: Duration,
}

impl Default for ListenReadonly {
    fn default() -> Self {
        ListenReadonly {
            address: None,
            max_replica_lag: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenTls {
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Where /livez, /readyz, /health, /metrics and /sessions answer.
    pub address: SocketAddr,
    /// Whether GET /sessions lists the client sessions (peer, user, database, state; no
    /// statement text unless `show_statements`).
    pub sessions: bool,
    /// Whether /sessions shows each session's last statement text (truncated). Off: it may
    /// carry personal data, and the health port may be reachable from a whole pod network.
    pub show_statements: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    /// One or more `host:port`; a name is resolved at every connect, so a DNS name that moves
    /// on failover is followed.
    pub hosts: Vec<String>,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    pub tls: ServerTls,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    /// Where the hosts' roles come from: bulkhead's own probe, or Patroni.
    pub discovery: Discovery,
    /// Patroni REST API base URLs (`http://host:port`), tried in turn for `/cluster`.
    pub patroni: Vec<String>,
    /// How often Patroni's `/cluster` is read.
    #[serde(deserialize_with = "duration")]
    pub patroni_interval: Duration,
}

/// `[database] discovery`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    /// The probe's status checks decide which host is the primary.
    Probe,
    /// Patroni's leader is the only host that may be the primary while Patroni answers; the
    /// probe's checks still guard it. Without an answer from Patroni, the probe decides.
    Patroni,
}

/// libpq's sslmode values.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTls {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl ServerTls {
    /// The value as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            ServerTls::Disable => "disable",
            ServerTls::Prefer => "prefer",
            ServerTls::Require => "require",
            ServerTls::VerifyCa => "verify-ca",
            ServerTls::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Probe {
    pub user: String,
    pub database: String,
    /// Name of the environment variable that holds the probe's password, if any.
    pub password_env: String,
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// How often the heartbeat (an empty query on a connection kept open to each host that is
    /// up) is sent; "0s" turns it off.
    #[serde(deserialize_with = "duration")]
    pub heartbeat: Duration,
    /// A heartbeat unanswered this long marks the host not answering, at once.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_timeout: Duration,
    /// How often the status check opens a new connection (a fork and a login on the server)
    /// to see that the host still starts sessions, unless one of bulkhead's own sessions
    /// logged in there within that time. Between them it runs on a kept connection.
    #[serde(deserialize_with = "duration")]
    pub new_session_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Deadline for a read statement.
    #[serde(deserialize_with = "duration")]
    pub read: Duration,
    /// Deadline for a write statement or the COMMIT of a transaction that wrote.
    #[serde(deserialize_with = "duration")]
    pub write: Duration,
    /// How long the server gets to answer bulkhead's CancelRequest.
    #[serde(deserialize_with = "duration")]
    pub cancel_grace: Duration,
    /// How long a client may take from connecting to its first ReadyForQuery (bulkhead's
    /// extension; PostgreSQL's own authentication_timeout is 1 minute).
    #[serde(deserialize_with = "duration")]
    pub startup: Duration,
    /// On SIGTERM, how long sessions get to finish their transaction (bulkhead's extension).
    #[serde(deserialize_with = "duration")]
    pub drain: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Circuit {
    pub failure_threshold: u32,
    #[serde(deserialize_with = "duration")]
    pub open_for: Duration,
    #[serde(deserialize_with = "duration")]
    pub hold_new_connections: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_clients: u32,
    pub max_inflight: u32,
    pub max_inflight_writes: u32,
    #[serde(deserialize_with = "duration")]
    pub queue_timeout: Duration,
    pub adaptive: bool,
}

/// How server connections are used: passed through per client, or pooled.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    pub mode: PoolMode,
    /// Server connections per (user, database), idle and lent together.
    pub size: u32,
    /// Idle connections kept open per pool, once a client of it has logged in.
    pub min_idle: u32,
    /// An idle connection above min_idle is closed after this long unused.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A connection is closed when it is returned after this long open; "0s": no limit.
    #[serde(deserialize_with = "duration")]
    pub lifetime: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// One server connection per client connection, authentication relayed.
    Passthrough,
    /// A pooled server connection lent for a client's whole connection.
    Session,
    /// A pooled server connection lent per transaction.
    Transaction,
}

/// Where bulkhead finds the secrets it checks clients against in the pooled modes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// A users file in PgBouncer's auth_file format.
    pub file: String,
    /// The query that returns (name, secret) for the user in $1, run as `user`.
    pub query: String,
    /// The login the auth query runs as; empty: no auth query.
    pub user: String,
    /// Name of the environment variable that holds that login's password, if any.
    pub password_env: String,
    /// The database the auth query runs in.
    pub database: String,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            mode: PoolMode::Passthrough,
            size: 20,
            min_idle: 0,
            idle_timeout: Duration::from_secs(600),
            lifetime: Duration::from_secs(3600),
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            file: String::new(),
            query: "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into(),
            user: String::new(),
            password_env: String::new(),
            database: "postgres".into(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: ([127, 0, 0, 1], 6432).into(),
            tls: ListenTls::Prefer,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            address: ([127, 0, 0, 1], 9930).into(),
            sessions: true,
            show_statements: false,
        }
    }
}

impl Default for Database {
    fn default() -> Self {
        Database {
            hosts: vec!["127.0.0.1:5432".into()],
            connect_timeout: Duration::from_secs(2),
            tls: ServerTls::Prefer,
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            discovery: Discovery::Probe,
            patroni: Vec::new(),
            patroni_interval: Duration::from_millis(500),
        }
    }
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            user: "postgres".into(),
            database: "postgres".into(),
            password_env: "BULKHEAD_PROBE_PASSWORD".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            heartbeat: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(400),
            new_session_interval: Duration::from_secs(60),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            read: Duration::from_secs(30),
            write: Duration::from_secs(2),
            cancel_grace: Duration::from_secs(1),
            startup: Duration::from_secs(60),
            drain: Duration::from_secs(30),
        }
    }
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            hold_new_connections: Duration::from_secs(5),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 1000,
            max_inflight: 64,
            max_inflight_writes: 4,
            queue_timeout: Duration::from_millis(100),
            adaptive: false,
        }
    }
}

/// A configuration that cannot be used, with a message naming the key and, when known, the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate(text)?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and keys that depend on each other.
    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let fail = |section: &str, key: &str, why: String| {
            let at = line_of(text, section, key).map_or(String::new(), |n| format!(" (line {n})"));
            Err(ConfigError(format!("{section}.{key}{at}: {why}")))
        };
        let positive = [
            ("database", "connect_timeout", self.database.connect_timeout),
            ("probe", "interval", self.probe.interval),
            ("probe", "timeout", self.probe.timeout),
            ("probe", "heartbeat_timeout", self.probe.heartbeat_timeout),
            (
                "probe",
                "new_session_interval",
                self.probe.new_session_interval,
            ),
            ("timeouts", "read", self.timeouts.read),
            ("timeouts", "write", self.timeouts.write),
            ("timeouts", "cancel_grace", self.timeouts.cancel_grace),
            ("timeouts", "startup", self.timeouts.startup),
            ("circuit", "open_for", self.circuit.open_for),
        ];
        for (section, key, value) in positive {
            if value.is_zero() {
                return fail(section, key, "must be longer than zero".into());
            }
        }
        // Every duration is added to the clock somewhere; an absurd one would overflow it and
        // take a session, the probe or the health thread down with it.
        let every = positive.into_iter().chain([
            ("timeouts", "drain", self.timeouts.drain),
            (
                "circuit",
                "hold_new_connections",
                self.circuit.hold_new_connections,
            ),
            ("limits", "queue_timeout", self.limits.queue_timeout),
            ("probe", "heartbeat", self.probe.heartbeat),
            (
                "database",
                "patroni_interval",
                self.database.patroni_interval,
            ),
            ("pool", "idle_timeout", self.pool.idle_timeout),
            (
                "listen_readonly",
                "max_replica_lag",
                self.listen_readonly.max_replica_lag,
            ),
            ("pool", "lifetime", self.pool.lifetime),
        ]);
        for (section, key, value) in every {
            if value > MAX_DURATION {
                return fail(
                    section,
                    key,
                    format!(
                        "{} is longer than the longest allowed, {}",
                        humantime::format_duration(value),
                        humantime::format_duration(MAX_DURATION)
                    ),
                );
            }
        }
        // A probe that cannot fork a backend and run a query in this time never finds a
        // primary, and one that runs more often only loads the server.
        for (key, value) in [
            ("interval", self.probe.interval),
            ("timeout", self.probe.timeout),
            ("heartbeat_timeout", self.probe.heartbeat_timeout),
            ("new_session_interval", self.probe.new_session_interval),
        ] {
            if value < MIN_PROBE {
                return fail(
                    "probe",
                    key,
                    format!(
                        "must be at least {} (a probe needs a new connection and a query)",
                        humantime::format_duration(MIN_PROBE)
                    ),
                );
            }
        }
        if !self.probe.heartbeat.is_zero() && self.probe.heartbeat < MIN_HEARTBEAT {
            return fail(
                "probe",
                "heartbeat",
                format!(
                    "must be \"0s\" (off) or at least {}",
                    humantime::format_duration(MIN_HEARTBEAT)
                ),
            );
        }
        if self.database.hosts.is_empty() {
            return fail("database", "hosts", "needs at least one host:port".into());
        }
        for host in &self.database.hosts {
            if let Err(why) = check_host_port(host) {
                return fail("database", "hosts", format!("{host:?}: {why}"));
            }
        }
        if self.database.discovery == Discovery::Patroni && self.database.patroni.is_empty() {
            return fail(
                "database",
                "patroni",
                "discovery = \"patroni\" needs at least one Patroni REST API URL".into(),
            );
        }
        for url in &self.database.patroni {
            if let Err(why) = crate::probe::patroni::Endpoint::parse(url) {
                return fail("database", "patroni", format!("{url:?}: {why}"));
            }
        }
        if self.database.patroni_interval < MIN_PROBE {
            return fail(
                "database",
                "patroni_interval",
                format!("must be at least {}", humantime::format_duration(MIN_PROBE)),
            );
        }
        for (key, value) in [
            ("max_clients", self.limits.max_clients),
            ("max_inflight", self.limits.max_inflight),
            ("max_inflight_writes", self.limits.max_inflight_writes),
        ] {
            if value == 0 {
                return fail("limits", key, "must be at least 1".into());
            }
        }
        if self.limits.max_inflight_writes > self.limits.max_inflight {
            return fail(
                "limits",
                "max_inflight_writes",
                format!(
                    "must not exceed limits.max_inflight ({})",
                    self.limits.max_inflight
                ),
            );
        }
        if self.circuit.failure_threshold == 0 {
            return fail("circuit", "failure_threshold", "must be at least 1".into());
        }
        if let Some(address) = self.listen_readonly.address
            && (address == self.listen.address || address == self.health.address)
        {
            return fail(
                "listen_readonly",
                "address",
                format!("{address} is already listen.address or health.address"),
            );
        }
        if self.pool.size == 0 {
            return fail("pool", "size", "must be at least 1".into());
        }
        if self.pool.min_idle > self.pool.size {
            return fail(
                "pool",
                "min_idle",
                format!("must not exceed pool.size ({})", self.pool.size),
            );
        }
        if self.pool.mode != PoolMode::Passthrough
            && self.auth.file.is_empty()
            && self.auth.user.is_empty()
        {
            return fail(
                "pool",
                "mode",
                "the pooled modes authenticate clients: set auth.file or auth.user (for the auth query)".into(),
            );
        }
        if !self.auth.user.is_empty() && self.auth.query.trim().is_empty() {
            return fail(
                "auth",
                "query",
                "must not be empty when auth.user is set".into(),
            );
        }
        if self.listen.tls_cert_file.is_empty() != self.listen.tls_key_file.is_empty() {
            return fail(
                "listen",
                "tls_cert_file",
                "tls_cert_file and tls_key_file go together".into(),
            );
        }
        if self.listen.tls == ListenTls::Require && self.listen.tls_cert_file.is_empty() {
            return fail(
                "listen",
                "tls",
                "\"require\" needs tls_cert_file and tls_key_file".into(),
            );
        }
        if self.database.cert_file.is_empty() != self.database.key_file.is_empty() {
            return fail(
                "database",
                "cert_file",
                "cert_file and key_file go together".into(),
            );
        }
        Ok(())
    }
}

/// The longest duration any key takes: a deadline of more than a day is no deadline, and
/// larger values would overflow the clock they are added to.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest probe interval and timeout.
const MIN_PROBE: Duration = Duration::from_millis(100);

/// The shortest heartbeat period other than off.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// `host:port` with a numeric port; the host may be a name, an IPv4 address or `[v6]`.
fn check_host_port(s: &str) -> Result<(), &'static str> {
    let (host, port) = s.rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() || host == "[]" {
        return Err("empty host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 address goes in brackets: [::1]:5432");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("port must be a number from 1 to 65535"),
        Ok(_) => Ok(()),
    }
}

/// The 1-based line where `key` is set inside `[section]`, for error messages.
fn line_of(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = "";
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim();
        } else if current == section
            && let Some(rest) = line.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(i + 1);
        }
    }
    None
}

/// Deserialises a duration written for people: "250ms", "5s", "1m", "1h 30m".
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}); write a number and a unit such as \"250ms\", \"5s\" or \"1m\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.address.to_string(), "127.0.0.1:6432");
        assert_eq!(c.health.address.to_string(), "127.0.0.1:9930");
        assert_eq!(c.database.hosts, vec!["127.0.0.1:5432"]);
        assert_eq!(c.timeouts.write, Duration::from_secs(2));
        assert_eq!(c.limits.queue_timeout, Duration::from_millis(100));
    }

    #[test]
    fn durations_are_read_for_people() {
        let c = Config::parse(
            "[timeouts]\nread = \"250ms\"\nwrite = \"1m\"\ncancel_grace = \"1s 500ms\"\n",
        )
        .unwrap();
        assert_eq!(c.timeouts.read, Duration::from_millis(250));
        assert_eq!(c.timeouts.write, Duration::from_secs(60));
        assert_eq!(c.timeouts.cancel_grace, Duration::from_millis(1500));
    }

    fn error(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn absurd_durations_and_too_quick_probes_are_refused_with_key_and_line() {
        let e = error("[timeouts]\nread = \"1s\"\nwrite = \"18000000000000000000s\"\n");
        assert!(e.contains("timeouts.write (line 3)"), "{e}");
        assert!(e.contains("longer than the longest allowed"), "{e}");
        let e = error("[circuit]\nhold_new_connections = \"400days\"\n");
        assert!(e.contains("circuit.hold_new_connections (line 2)"), "{e}");
        let e = error("[probe]\ninterval = \"1ns\"\n");
        assert!(
            e.contains("probe.interval (line 2): must be at least 100ms"),
            "{e}"
        );
        let e = error("[probe]\ntimeout = \"1ns\"\n");
        assert!(e.contains("probe.timeout (line 2)"), "{e}");
        assert!(Config::parse("[timeouts]\nread = \"24h\"\n").is_ok());
        let e = error("[probe]\nheartbeat = \"1ms\"\n");
        assert!(
            e.contains("probe.heartbeat (line 2): must be \"0s\" (off) or at least 10ms"),
            "{e}"
        );
        let e = error("[probe]\nheartbeat_timeout = \"20ms\"\n");
        assert!(e.contains("probe.heartbeat_timeout (line 2)"), "{e}");
        let off = Config::parse("[probe]\nheartbeat = \"0s\"\n").unwrap();
        assert!(off.probe.heartbeat.is_zero());
    }

    #[test]
    fn the_read_only_listener_is_off_by_default_and_checked_when_on() {
        assert_eq!(Config::parse("").unwrap().listen_readonly.address, None);
        let c = Config::parse(
            "[listen_readonly]\naddress = \"127.0.0.1:6433\"\nmax_replica_lag = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(
            c.listen_readonly.address,
            Some(([127, 0, 0, 1], 6433).into())
        );
        assert_eq!(c.listen_readonly.max_replica_lag, Duration::from_secs(2));
        let e = error("[listen_readonly]\naddress = \"127.0.0.1:6432\"\n");
        assert!(
            e.contains("listen_readonly.address (line 2): 127.0.0.1:6432 is already"),
            "{e}"
        );
        let e = error("[listen_readonly]\nmax_lag = \"1s\"\n");
        assert!(e.contains("max_lag"), "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = error("[timeouts]\nread = \"1s\"\nwrtie = \"1s\"\n");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("wrtie"), "{e}");
        let e = error("[limit]\nmax_clients = 1\n");
        assert!(e.contains("line 1") && e.contains("limit"), "{e}");
    }

    #[test]
    fn bad_values_are_named_with_their_line() {
        let cases = [
            (
                "[timeouts]\nwrite = \"fast\"\n",
                "line 2",
                "invalid duration",
            ),
            ("[timeouts]\nwrite = 5\n", "line 2", "string"),
            ("[limits]\nmax_clients = -1\n", "line 2", "max_clients"),
            ("[database]\ntls = \"sometimes\"\n", "line 2", "verify-full"),
            ("[listen]\naddress = \"nowhere\"\n", "line 2", "address"),
            (
                "\n[limits]\nmax_inflight = 4\nmax_inflight_writes = 8\n",
                "line 4",
                "limits.max_inflight_writes",
            ),
            ("[timeouts]\n\nread = \"0s\"\n", "line 3", "timeouts.read"),
            ("[database]\nhosts = []\n", "line 2", "database.hosts"),
            (
                "[database]\nhosts = [\"db:port\"]\n",
                "line 2",
                "port must be",
            ),
            ("[database]\nhosts = [\"::1:5432\"]\n", "line 2", "brackets"),
            (
                "[circuit]\nfailure_threshold = 0\n",
                "line 2",
                "circuit.failure_threshold",
            ),
            ("[listen]\ntls = \"require\"\n", "line 2", "listen.tls"),
            (
                "[database]\ncert_file = \"client.pem\"\n",
                "line 2",
                "database.cert_file",
            ),
        ];
        for (text, line, what) in cases {
            let e = error(text);
            assert!(e.contains(line) && e.contains(what), "{text:?} gave {e}");
        }
    }

    #[test]
    fn every_example_in_config_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "examples found: {seen}");
    }

    #[test]
    fn hosts_accept_names_ipv4_and_bracketed_ipv6() {
        let c = Config::parse(
            "[database]\nhosts = [\"db.internal:5432\", \"10.0.0.2:6543\", \"[::1]:5432\"]\n",
        )
        .unwrap();
        assert_eq!(c.database.hosts.len(), 3);
    }
}
