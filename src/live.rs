//! Settings that SIGHUP can change while sessions run.
//!
//! Sessions keep their own `Arc<Config>` and compare a generation number (one relaxed atomic
//! load, of a value written only on reload) to learn that it changed. So reading settings on
//! the relay path takes no lock shared by all sessions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Config;

#[derive(Debug)]
pub struct Live {
    generation: AtomicU64,
    current: Mutex<Arc<Config>>,
}

impl Live {
    pub fn new(config: Config) -> Self {
        Live {
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(config)),
        }
    }

    /// The settings in force now.
    pub fn get(&self) -> Arc<Config> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Takes what SIGHUP may change (timeouts, circuit, limits, pool sizes, auth, max_replica_lag) from `new`; keeps the rest and
    /// returns the names of sections whose changes need a restart.
    pub fn reload(&self, new: Config) -> Vec<&'static str> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (**current).clone();
        let mut ignored = Vec::new();
        if new.listen != next.listen {
            ignored.push("listen");
        }
        if new.listen_readonly.address != next.listen_readonly.address {
            ignored.push("listen_readonly.address");
        }
        next.listen_readonly.max_replica_lag = new.listen_readonly.max_replica_lag;
        if new.health != next.health {
            ignored.push("health");
        }
        if new.database != next.database {
            ignored.push("database");
        }
        if new.probe != next.probe {
            ignored.push("probe");
        }
        if new.pool.mode != next.pool.mode {
            ignored.push("pool.mode");
        }
        let mode = next.pool.mode;
        next.pool = new.pool;
        next.pool.mode = mode;
        next.auth = new.auth;
        next.timeouts = new.timeouts;
        next.circuit = new.circuit;
        next.limits = new.limits;
        *current = Arc::new(next);
        self.generation.fetch_add(1, Ordering::Release);
        ignored
    }
}

/// One session's copy of the settings, refreshed when they change.
#[derive(Debug)]
pub struct Snapshot {
    config: Arc<Config>,
    generation: u64,
}

impl Snapshot {
    pub fn new(live: &Live) -> Self {
        let generation = live.generation();
        Snapshot {
            config: live.get(),
            generation,
        }
    }

    /// The settings, fetched again if a reload happened since the last call.
    pub fn current(&mut self, live: &Live) -> &Config {
        let generation = live.generation();
        if generation != self.generation {
            self.generation = generation;
            self.config = live.get();
        }
        &self.config
    }

    /// The settings as last fetched.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The settings, shared.
    pub fn arc(&self) -> Arc<Config> {
        self.config.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reload_applies_timeouts_limits_and_circuit_and_names_the_rest() {
        let live = Live::new(Config::default());
        let mut snapshot = Snapshot::new(&live);
        let mut new = Config::default();
        new.timeouts.write = Duration::from_secs(1);
        new.limits.max_clients = 5;
        new.circuit.failure_threshold = 9;
        new.database.hosts = vec!["10.0.0.9:5432".into()];
        new.listen.address = ([127, 0, 0, 1], 7000).into();
        assert_eq!(live.reload(new), vec!["listen", "database"]);
        assert_eq!(
            snapshot.config().timeouts.write,
            Config::default().timeouts.write,
            "not refreshed yet"
        );
        let c = snapshot.current(&live);
        assert_eq!(c.timeouts.write, Duration::from_secs(1));
        assert_eq!(c.limits.max_clients, 5);
        assert_eq!(c.circuit.failure_threshold, 9);
        assert_eq!(
            c.database.hosts,
            vec!["127.0.0.1:5432"],
            "hosts need a restart"
        );
    }
}
