//! The relay's server half: what the server sends: ReadyForQuery (the end of a request, its
//! outcome for the metrics and the write circuit), errors, the cancel key and SASL offer at
//! login, and the answers bulkhead drops (to its own Parses and Closes, and late ones after a
//! detach).

use crate::clock::Instant;

use super::*;

impl Relay {
    /// Frames what the server sent: swaps its cancel key for the client's own, follows
    /// ReadyForQuery and errors, and turns the answer to one of bulkhead's cancels into the
    /// error the client should see.
    pub(super) fn frame_server(&mut self, shared: &Shared) -> Result<Option<End>, String> {
        let cancelling = self.cancelling.is_some();
        let tls_login = self.server_tls && !self.authenticated();
        let per_transaction = self.per_transaction();
        let inspect = |tag| {
            matches!(
                tag,
                backend::READY_FOR_QUERY_TAG
                    | backend::ERROR_RESPONSE_TAG
                    | backend::BACKEND_KEY_DATA_TAG
            ) || (cancelling && tag == backend::NOTICE_RESPONSE_TAG)
                || (tls_login && tag == backend::AUTHENTICATION_TAG)
                || (per_transaction && tag == backend::PARAMETER_STATUS_TAG)
        };
        while let Some(h) = self
            .down
            .next(inspect)
            .map_err(|e| format!("invalid message from server: {e}"))?
        {
            if let Some(d) = &mut self.detached
                && d.owed > 0
            {
                cold_path();
                // A late answer to a request the client was already answered for: dropped,
                // but for notifications, which belong to no request.
                match h.tag {
                    backend::NOTIFICATION_RESPONSE_TAG => {
                        self.down.forward(&h);
                        continue;
                    }
                    backend::READY_FOR_QUERY_TAG => {
                        let status = ready_status(self.down.body(&h))?;
                        self.tx = status;
                        self.tracker.ready(status, Instant::now());
                        d.owed -= 1;
                        self.head_done();
                    }
                    _ => {}
                }
                self.down.skip(&h);
                continue;
            }
            match h.tag {
                backend::READY_FOR_QUERY_TAG => {
                    let status = ready_status(self.down.body(&h))?;
                    let before = std::mem::replace(&mut self.tx, status);
                    if self.startup_deadline.take().is_some() {
                        cold_path();
                        self.idle_since = Some(Instant::now());
                        // The startup timer is set a minute out; re-arm once, at login, so an
                        // idle new session gives its buffers back soon.
                        self.timer_at = None;
                        self.down.forward(&h);
                        continue;
                    }
                    let failed = self.head_failed;
                    let own = self.request_finished(shared, status, before);
                    if let Some(l) = self.lending.as_deref_mut()
                        && l.per_transaction
                    {
                        l.request_done(!failed);
                        if self.tracker.in_flight() == 0 {
                            // Every answer owed has come (or an error ended its batch).
                            self.swallow_parse_complete = 0;
                            self.swallow_close_complete = 0;
                        }
                    }
                    if let Some(own) = own {
                        self.down.replace(&h, &own);
                        continue;
                    }
                }
                backend::ERROR_RESPONSE_TAG => {
                    cold_path();
                    let info = backend::error_info(self.down.body(&h));
                    if matches!(info.severity, Severity::Fatal | Severity::Panic)
                        && self.down.is_whole(&h)
                        && self.can_survive_loss()
                    {
                        // Transaction pooling: the server ends this connection (a shutdown,
                        // a terminated backend), not the client's. The client is told about
                        // its transaction, not that its connection is gone.
                        let why = format!(
                            "the server ended the connection: {} (SQLSTATE {})",
                            String::from_utf8_lossy(info.message),
                            String::from_utf8_lossy(info.code)
                        );
                        self.down.skip(&h);
                        return Ok(Some(End::ServerLost(why)));
                    }
                    self.server_said_fatal =
                        matches!(info.severity, Severity::Fatal | Severity::Panic);
                    self.head_failed = true;
                    self.head_read_only |= info.code == b"25006";
                    if let Some(c) = self.cancelling
                        && info.code == b"57014"
                        && info.severity == Severity::Error
                        && self.down.is_whole(&h)
                    {
                        // The server's "canceling statement due to user request" would
                        // puzzle the client: say which deadline passed instead.
                        let mut own = BytesMut::new();
                        Refusal::Cancelled(c.deadline).write(&mut own);
                        self.down.replace(&h, &own);
                        continue;
                    }
                }
                backend::NOTICE_RESPONSE_TAG => {
                    cold_path();
                    if let Some(c) = self.cancelling {
                        let info = backend::error_info(self.down.body(&h));
                        // The answer to cancelling a commit that waits for synchronous
                        // replication: a WARNING (01000) that it committed locally only.
                        if c.deadline.class == Class::Write && info.code == b"01000" {
                            return Ok(Some(End::CommitUnconfirmed(c.deadline)));
                        }
                    }
                }
                backend::PARSE_COMPLETE_TAG if self.swallow_parse_complete > 0 => {
                    self.swallow_parse_complete -= 1;
                    self.down.skip(&h);
                    continue;
                }
                backend::CLOSE_COMPLETE_TAG if self.swallow_close_complete > 0 => {
                    self.swallow_close_complete -= 1;
                    self.down.skip(&h);
                    continue;
                }
                backend::PARAMETER_STATUS_TAG if per_transaction && self.down.is_whole(&h) => {
                    cold_path();
                    if let Some(l) = self.lending.as_deref_mut()
                        && let Some((name, rest)) = crate::protocol::cstr(self.down.body(&h))
                        && let Some((value, _)) = crate::protocol::cstr(rest)
                        && let (Ok(name), Ok(value)) =
                            (std::str::from_utf8(name), std::str::from_utf8(value))
                    {
                        l.reported(name, value);
                    }
                }
                backend::COPY_IN_RESPONSE_TAG | backend::COPY_BOTH_RESPONSE_TAG => {
                    self.tracker.copy_in_started()
                }
                backend::AUTHENTICATION_TAG if tls_login && self.down.is_whole(&h) => {
                    cold_path();
                    let body = self.down.body(&h);
                    // With TLS on both sides and the server's own certificate on the
                    // listener, the client's channel binding (a hash of the certificate it
                    // saw) is the server's: SCRAM-SHA-256-PLUS passes through as offered.
                    let server_cert = self.server.as_ref().and_then(|s| s.server_certificate());
                    let binds = self.client.is_tls()
                        && server_cert.is_some_and(|c| shared.tls.get().presents(c));
                    debug!(parent: &self.span, binds, client_tls = self.client.is_tls(), server_cert = server_cert.map(<[u8]>::len), "the server offers SASL");
                    if !binds && backend::is_sasl_offer(body) {
                        self.sasl_offered = true;
                        // Otherwise SCRAM-SHA-256-PLUS would bind the login to bulkhead's TLS
                        // session with the server, which the client cannot see: never offer it.
                        let mut own = BytesMut::new();
                        if backend::write_sasl_offer_without_plus(&mut own, body) {
                            self.down.replace(&h, &own);
                            continue;
                        }
                    }
                }
                backend::BACKEND_KEY_DATA_TAG
                    if !self.authenticated() && self.down.is_whole(&h) =>
                {
                    cold_path();
                    let (pid, key) = backend::backend_key_data(self.down.body(&h))
                        .ok_or("invalid BackendKeyData from server")?;
                    let target = Target {
                        addr: self.server_addr,
                        pid,
                        key: bytes::Bytes::copy_from_slice(key),
                    };
                    self.server_key = Some((pid, bytes::Bytes::copy_from_slice(key)));
                    let (client_pid, secret) = shared.cancels.register(target);
                    // The host starts sessions: the probe need not fork one to know.
                    shared.topology.saw_login(self.host);
                    self.client_key = Some((client_pid, secret));
                    let mut own = BytesMut::with_capacity(13);
                    backend::write_backend_key_data(&mut own, client_pid, &secret);
                    self.down.replace(&h, &own);
                    continue;
                }
                _ => {}
            }
            self.down.forward(&h);
        }
        Ok(None)
    }

    /// The head request's ReadyForQuery (`status`; `before` is the status it started in):
    /// record how it went, tell the write circuit, and start the next one's clock. Returns
    /// what the client gets instead of the server's ReadyForQuery, for a request bulkhead
    /// refused.
    pub(super) fn request_finished(
        &mut self,
        shared: &Shared,
        status: TxStatus,
        before: TxStatus,
    ) -> Option<BytesMut> {
        let now = Instant::now();
        let done = self.tracker.ready(status, now)?;
        if self.answer_note_due.is_none_or(|due| now >= due) {
            cold_path();
            // The host answers: evidence the heartbeat weighs before calling it frozen.
            self.answer_note_due = Some(now + ANSWER_NOTE_EVERY);
            shared
                .topology
                .circuit(self.host)
                .saw_answer(now.into_tokio());
        }
        let outcome = match done.effect {
            Effect::Refused(_) => Outcome::Refused,
            _ if self.head_timed_out => Outcome::Timeout,
            _ if self.head_failed => Outcome::Error,
            _ => Outcome::Ok,
        };
        let m = shared.metrics.class(done.class);
        m.statement(outcome).increment(1);
        if !matches!(done.effect, Effect::Refused(_)) {
            m.duration.record(done.took);
            if self.config.config().limits.adaptive {
                shared.admission.all.sample(done.took);
                if done.class == Class::Write {
                    shared.admission.writes.sample(done.took);
                }
            }
        }
        if status == TxStatus::Idle && self.tracker.in_flight() == 0 {
            self.release_slots(shared);
        }
        if self.tracker.in_flight() == 0 {
            self.idle_since = Some(now);
        }
        // Only evidence about the commit path moves the write circuit: a commit confirmed
        // (the request ended outside a transaction, without error) or one that missed its
        // deadline. A write inside a transaction proves nothing about the COMMIT to come.
        if done.class == Class::Write
            && !matches!(done.effect, Effect::Refused(_))
            && !self.readonly
        {
            let settings = circuit_settings(self.config.config());
            let circuit = shared.topology.circuit(self.host);
            let commits = before == TxStatus::Idle || done.commit;
            if self.head_read_only {
                cold_path();
                circuit.failure(&settings, "read-only transaction (25006) from a primary");
            } else if self.head_timed_out {
                cold_path();
                if commits {
                    circuit.failure(&settings, "a commit missed the write deadline");
                }
            } else if status == TxStatus::Idle && !self.head_failed {
                let how = if done.effect == Effect::Trial {
                    Success::Trial
                } else {
                    Success::Commit
                };
                circuit.success(&settings, how);
                circuit.saw_commit(now.into_tokio());
            }
        }
        self.head_done();
        match done.effect {
            Effect::Refused(why) => {
                cold_path();
                let refusal = match why {
                    Refused::CircuitOpen { retry_at } => Refusal::CircuitOpen {
                        retry_in: retry_at.saturating_duration_since(now),
                    },
                    Refused::InFailedBlock => Refusal::InFailedBlock,
                    Refused::Shed { waited } => Refusal::Shed { waited },
                };
                // Exactly as if the server had raised the error: outside a block nothing
                // changes; inside one, the block has failed.
                let client_status = if status == TxStatus::Idle {
                    TxStatus::Idle
                } else {
                    TxStatus::Failed
                };
                self.client_tx_failed =
                    client_status == TxStatus::Failed && status == TxStatus::InBlock;
                let mut own = BytesMut::new();
                refusal.write(&mut own);
                backend::write_ready_for_query(&mut own, client_status);
                Some(own)
            }
            Effect::EndsFailedBlock => {
                self.client_tx_failed = false;
                None
            }
            Effect::Normal | Effect::Trial => None,
        }
    }

    /// Forgets what was learned about the head request: it has been answered (or abandoned).
    pub(super) fn head_done(&mut self) {
        self.head_failed = false;
        self.head_read_only = false;
        self.head_timed_out = false;
        self.cancelling = None;
    }
}
