//! Integration tests: real PostgreSQL servers started by the suite, real clients, bulkhead in
//! process (or as the real binary where signals matter).

mod admission;
mod alerts;
mod commit_path;
mod deadlines;
mod failover;
mod failure_edges;
mod health;
mod operator;
mod passthrough;
mod patroni;
mod pooled_failover;
mod pooling;
mod probe_cost;
mod readonly;
mod scripted_server;
mod sessions;
mod support;
mod tls;
mod transaction_pooling;
