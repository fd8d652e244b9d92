//! The relay's client half: what the client sends, framed and classified; admission (slots,
//! shedding), the write circuit's refusals and a failed block's rules, before anything reaches
//! the server.

use crate::clock::Instant;

use super::*;

impl Relay {
    /// Transaction pooling between transactions: the client's next message needs a
    /// connection (but a goodbye does not). Some: framing stops here for now.
    #[inline(never)]
    fn lend_for_next(&mut self) -> Result<Option<Hold>, End> {
        let Some(h) = self.up.next(|_| false).map_err(client_broke)? else {
            return Ok(Some(Hold::Done));
        };
        if h.tag == frontend::TERMINATE_TAG {
            self.client_terminated = true;
            self.up.skip(&h);
            return Err(End::ClientLeft);
        }
        let l = self.lending.as_deref_mut().expect("checked");
        if l.waiting() {
            return Ok(Some(Hold::Wait));
        }
        match l.try_now(self.config.config()) {
            Some(stream) => {
                self.attach(stream);
                Ok(None)
            }
            None => {
                l.start_wait(self.config.arc());
                Ok(Some(Hold::Wait))
            }
        }
    }

    /// Frames what the client sent: classifies statements, keeps track of requests, and refuses
    /// what must not run.
    #[inline(always)]
    pub(super) fn frame_client(&mut self, shared: &Shared) -> Result<Hold, End> {
        let sasl = self.sasl_offered;
        let describe = self.detached.is_some() || self.per_transaction();
        let inspect = |tag| {
            matches!(
                tag,
                frontend::QUERY_TAG
                    | frontend::PARSE_TAG
                    | frontend::BIND_TAG
                    | frontend::EXECUTE_TAG
                    | frontend::CLOSE_TAG
            ) || (sasl && tag == frontend::PASSWORD_TAG)
                || (describe && tag == frontend::DESCRIBE_TAG)
        };
        // One clock reading for everything framed in this pass: it all arrived together.
        let mut clock = None;
        loop {
            // Nothing after a refused request may run before its answer is known: it decides
            // whether the client's transaction block has failed.
            if self.detached.is_some() {
                cold_path();
                if self.reattach(shared) {
                    return Ok(Hold::Wait);
                }
                // Answered here, one message after the other as the client reads them: a
                // client that sends without reading is held back as the server would.
                if self.detached.is_some() && self.down.has_output() {
                    return Ok(Hold::Wait);
                }
            }
            if self.detached.is_none()
                && self.authenticated()
                && self.tracker.refusal_in_flight()
                && !self.skip_to_sync
            {
                return Ok(Hold::Wait);
            }
            if self.server.is_none()
                && self.lending.is_some()
                && self.detached.is_none()
                && let Some(hold) = self.lend_for_next()?
            {
                return Ok(hold);
            }
            let Some(h) = self.up.next(inspect).map_err(client_broke)? else {
                return Ok(Hold::Done);
            };
            if !self.authenticated() {
                cold_path();
                if h.tag == frontend::PASSWORD_TAG && self.sasl_offered {
                    self.sasl_offered = false;
                    if let Some(why) = channel_binding_problem(self.up.body(&h)) {
                        return Err(End::Refused(Refusal::ChannelBinding(why)));
                    }
                }
                self.up.forward(&h);
                continue;
            }
            let now = *clock.get_or_insert_with(Instant::now);
            self.idle_since = None;
            if let Some(d) = &mut self.detached {
                cold_path();
                let tracker = &self.tracker;
                let answer = d.answer(
                    h.tag,
                    self.up.body(&h),
                    |statement| tracker.control_of(statement),
                    self.down.inject(),
                );
                self.up.skip(&h);
                if answer == Next::Terminate {
                    self.client_terminated = true;
                    return Err(End::ClientLeft);
                }
                continue;
            }
            // A statement for a host that stopped answering is answered here, not sent.
            if !self.tracker.is_open()
                && self.tracker.in_flight() == 0
                && shared.topology.circuit(self.host).is_unresponsive()
            {
                cold_path();
                let why = shared.topology.circuit(self.host).reason_unresponsive();
                self.detached = Some(Box::new(Detached::new(why, self.client_tx(), 0)));
                self.client_tx_failed = false;
                continue;
            }
            if self.skip_to_sync {
                cold_path();
                if h.tag == frontend::SYNC_TAG {
                    self.skip_to_sync = false;
                    self.tracker.sync(now);
                    self.up.forward(&h);
                } else {
                    self.up.skip(&h);
                }
                continue;
            }
            match h.tag {
                frontend::QUERY_TAG => {
                    if self.refusal_possible(shared) && self.tracker.in_flight() > 0 {
                        return Ok(Hold::Wait);
                    }
                    let text = frontend::query_text(self.up.body(&h));
                    if let Some(view) = &self.view {
                        view.statement(text);
                    }
                    if let Some(l) = self.lending.as_deref_mut()
                        && l.per_transaction
                        && l.pinned.is_none()
                        && let Some(feature) = session_feature(text)
                    {
                        l.pin(feature);
                    }
                    if self.client_tx_failed {
                        cold_path();
                        let control = transaction_control(text);
                        self.tracker.query(Kind::Read, now);
                        if self.in_failed_block(&h, control, true) {
                            continue;
                        }
                    } else {
                        let kind = self.memo.classify(text, self.up.is_whole(&h));
                        let write = self.tracker.peek_class(kind) == Class::Write;
                        match self.admit(shared, write) {
                            Admit::Go => {}
                            Admit::Wait => return Ok(Hold::Wait),
                            Admit::Shed { write_slot } => {
                                cold_path();
                                self.tracker.query(kind, now);
                                self.shed(shared, write_slot, &h, true);
                                continue;
                            }
                        }
                        self.tracker.query(kind, now);
                        if write && !self.admit_write(shared) {
                            cold_path();
                            self.up.replace(&h, SYNC);
                            continue;
                        }
                    }
                }
                frontend::PARSE_TAG => {
                    if self.per_transaction()
                        && self.tracker.before_open() > 0
                        && frontend::parse_message(self.up.body(&h))
                            .is_some_and(|(name, _)| !name.is_empty())
                    {
                        // What the connection holds is known only once earlier requests are
                        // answered.
                        return Ok(Hold::Wait);
                    }
                    if self.client_tx_failed && !self.tracker.is_open() {
                        if self.tracker.in_flight() > 0 {
                            return Ok(Hold::Wait);
                        }
                        let (_, text) =
                            frontend::parse_message(self.up.body(&h)).unwrap_or((b"", b""));
                        let control = transaction_control(text);
                        self.tracker.extended(now);
                        if self.in_failed_block(&h, control, false) {
                            continue;
                        }
                    }
                    let (name, text) =
                        frontend::parse_message(self.up.body(&h)).unwrap_or((b"", b""));
                    if let Some(view) = &self.view {
                        view.statement(text);
                    }
                    let kind = self.memo.classify(text, self.up.is_whole(&h));
                    if kind != Kind::Write
                        && !name.is_empty()
                        && let Some(control) = transaction_control(text)
                    {
                        self.tracker.parse_control(name, control);
                    }
                    self.tracker.parse(name, kind, now);
                    if self.per_transaction() {
                        self.track_parse(&h);
                    }
                }
                frontend::EXECUTE_TAG => {
                    if self.refusal_possible(shared) {
                        if self.tracker.before_open() > 0 {
                            return Ok(Hold::Wait);
                        }
                        if shared.topology.circuit(self.host).is_unresponsive() {
                            // The batch's first messages went to the server: close it there
                            // and answer the client here.
                            if let Some(end) = self.detach(shared) {
                                return Err(end);
                            }
                            if self.detached.is_some() {
                                continue;
                            }
                        }
                    }
                    if self.client_tx_failed && self.failed_batch_starts(now, &h) {
                        continue;
                    }
                    let portal = frontend::execute_portal(self.up.body(&h)).unwrap_or(b"\0");
                    let kind = self.tracker.portal_kind(portal);
                    let write = self.tracker.peek_execute(kind) == Class::Write;
                    match self.admit(shared, write) {
                        Admit::Go => {}
                        Admit::Wait => return Ok(Hold::Wait),
                        Admit::Shed { write_slot } => {
                            self.tracker.extended(now);
                            self.shed(shared, write_slot, &h, false);
                            continue;
                        }
                    }
                    let became_write = self.tracker.execute(kind, now);
                    if became_write && !self.admit_write(shared) {
                        self.skip_to_sync = true;
                        self.up.skip(&h);
                        continue;
                    }
                }
                frontend::BIND_TAG
                | frontend::CLOSE_TAG
                | frontend::DESCRIBE_TAG
                | frontend::FLUSH_TAG => {
                    if self.client_tx_failed && self.failed_batch_starts(now, &h) {
                        continue;
                    }
                    if self.per_transaction() && !self.track_statement_use(&h) {
                        return Ok(Hold::Wait);
                    }
                    let body = self.up.body(&h);
                    match h.tag {
                        frontend::BIND_TAG => {
                            let (portal, statement) =
                                frontend::bind_names(body).unwrap_or((b"", b"\0"));
                            self.tracker.bind(portal, statement, now);
                        }
                        frontend::CLOSE_TAG => {
                            let (what, name) = frontend::close_target(body).unwrap_or((b'S', b""));
                            self.tracker.close(what, name, now);
                        }
                        _ => self.tracker.extended(now),
                    }
                }
                frontend::SYNC_TAG => self.tracker.sync(now),
                frontend::FUNCTION_CALL_TAG => {
                    self.tracker.function_call(now);
                    if self.client_tx_failed {
                        self.tracker
                            .mark_last(Effect::Refused(Refused::InFailedBlock));
                        self.up.replace(&h, SYNC);
                        continue;
                    }
                }
                frontend::COPY_DONE_TAG | frontend::COPY_FAIL_TAG => {
                    self.tracker.copy_in_ended(now)
                }
                frontend::TERMINATE_TAG => {
                    self.client_terminated = true;
                    if self.lending.is_some() {
                        // The server connection stays open for the pool's next client.
                        self.up.skip(&h);
                        return Err(End::ClientLeft);
                    }
                }
                _ => {}
            }
            self.up.forward(&h);
        }
    }

    /// Takes the slots a statement needs: an "all" slot unless the session holds one, and a
    /// write slot for a write unless it holds one. When one is not free, waits in turn (in
    /// the background, at most queue_timeout) — but only once the requests before this one
    /// have been answered, since shedding it depends on the transaction state they leave.
    #[inline]
    pub(super) fn admit(&mut self, shared: &Shared, write: bool) -> Admit {
        if let Some(write_slot) = self.shed_next.take() {
            return Admit::Shed { write_slot };
        }
        if self.slot_wait.is_some() {
            return Admit::Wait;
        }
        let admission = &shared.admission;
        // In transaction pooling the wait for a pooled connection is the queue for a
        // transaction: no second one for the "all" limit. The write limit stays, which keeps
        // stalled commits from holding every pooled connection.
        if !self.holds_all && !self.per_transaction() {
            if admission.all.try_acquire() {
                self.holds_all = true;
            } else {
                return self.wait_for_slot(shared, false);
            }
        }
        if write && !self.holds_write {
            if admission.writes.try_acquire() {
                self.holds_write = true;
            } else {
                return self.wait_for_slot(shared, true);
            }
        }
        Admit::Go
    }

    pub(super) fn wait_for_slot(&mut self, shared: &Shared, write: bool) -> Admit {
        if self.tracker.before_open() > 0 {
            return Admit::Wait; // Asked again when the requests before it are answered.
        }
        let until = Instant::now() + self.config.config().limits.queue_timeout;
        let limit = if write {
            &shared.admission.writes
        } else {
            &shared.admission.all
        };
        if let Some(view) = &self.view {
            view.waiting(write);
        }
        self.slot_wait = Some(SlotWait {
            write,
            wait: Box::pin(limit.acquire_until(until.into_tokio())),
        });
        Admit::Wait
    }

    /// Refuses the newest request with 53400: no slot came free within queue_timeout.
    pub(super) fn shed(&mut self, shared: &Shared, write_slot: bool, h: &Header, simple: bool) {
        shared.admission.shed(write_slot);
        let waited = self.config.config().limits.queue_timeout;
        self.tracker
            .mark_last(Effect::Refused(Refused::Shed { waited }));
        if simple {
            self.up.replace(h, SYNC);
        } else {
            self.skip_to_sync = true;
            self.up.skip(h);
        }
    }

    /// Gives back the session's slots; called when its transaction has ended and nothing is
    /// in flight, and when it ends.
    pub(super) fn release_slots(&mut self, shared: &Shared) {
        if std::mem::take(&mut self.holds_all) {
            shared.admission.all.release();
        }
        if std::mem::take(&mut self.holds_write) {
            shared.admission.writes.release();
        }
    }

    /// Whether the next write might be refused, so that it must wait for the answers to the
    /// requests before it (the transaction status the refusal depends on). False in the
    /// healthy steady state, where it costs one atomic load.
    pub(super) fn refusal_possible(&self, shared: &Shared) -> bool {
        self.client_tx_failed
            || (!self.readonly && shared.topology.circuit(self.host).is_troubled())
    }

    /// Asks the write circuit whether the newest request, a write, may run; marks it refused or
    /// as the trial if not plainly allowed.
    pub(super) fn admit_write(&mut self, shared: &Shared) -> bool {
        if self.readonly {
            // The server answers a write with 25006; no circuit has a say.
            return true;
        }
        let settings = circuit_settings(self.config.config());
        // Decided only with nothing before it in flight (see `refusal_possible`), so the
        // transaction status is the one this write runs in.
        let commits = self.tx == TxStatus::Idle || self.tracker.last_is_commit();
        match shared
            .topology
            .circuit(self.host)
            .decide(&settings, commits)
        {
            Decision::Allow => true,
            Decision::Trial => {
                self.tracker.mark_last(Effect::Trial);
                true
            }
            Decision::Refuse { retry_at } => {
                self.tracker
                    .mark_last(Effect::Refused(Refused::CircuitOpen {
                        retry_at: Instant::from_tokio(retry_at),
                    }));
                false
            }
        }
    }

    /// The client's block has failed but the server's has not: let ROLLBACK and ROLLBACK TO
    /// through, turn COMMIT into ROLLBACK (what PostgreSQL does with a failed block), refuse
    /// anything else with 25P02. `simple` is a Query; otherwise the first message of a batch.
    /// Returns true if the message was consumed (replaced or skipped), false if it is to be
    /// forwarded as it is.
    pub(super) fn in_failed_block(
        &mut self,
        h: &Header,
        control: Option<Control>,
        simple: bool,
    ) -> bool {
        match control {
            Some(Control::Rollback | Control::RollbackTo) => {
                self.tracker.mark_last(Effect::EndsFailedBlock);
                false
            }
            Some(Control::Commit) if simple => {
                self.tracker.mark_last(Effect::EndsFailedBlock);
                self.up.replace(h, ROLLBACK_QUERY);
                true
            }
            Some(Control::Commit) => {
                self.tracker.mark_last(Effect::EndsFailedBlock);
                let name = frontend::parse_message(self.up.body(h))
                    .map(|(n, _)| n.to_vec())
                    .unwrap_or_default();
                self.tracker.parse(&name, Kind::Read, Instant::now());
                let mut parse = BytesMut::new();
                frontend::write_parse(&mut parse, &name, b"ROLLBACK");
                self.up.replace(h, &parse);
                true
            }
            None => {
                self.tracker
                    .mark_last(Effect::Refused(Refused::InFailedBlock));
                if simple {
                    self.up.replace(h, SYNC);
                } else {
                    self.skip_to_sync = true;
                    self.up.skip(h);
                }
                true
            }
        }
    }

    /// In a failed block, a batch that does not start with a Parse of ROLLBACK or COMMIT is
    /// refused whole. Returns true if the message was consumed that way.
    pub(super) fn failed_batch_starts(&mut self, now: Instant, h: &Header) -> bool {
        if self.tracker.is_open() {
            return false;
        }
        self.tracker.extended(now);
        // A Bind of a ROLLBACK or COMMIT prepared earlier (drivers cache them) still ends the
        // block; a prepared COMMIT becomes a ROLLBACK, as PostgreSQL makes it.
        if h.tag == frontend::BIND_TAG {
            let (portal, statement) = frontend::bind_names(self.up.body(h)).unwrap_or((b"", b"\0"));
            match self.tracker.control_of(statement) {
                Some(Control::Rollback | Control::RollbackTo) => {
                    self.tracker.mark_last(Effect::EndsFailedBlock);
                    return false;
                }
                Some(Control::Commit) => {
                    let portal = portal.to_vec();
                    self.tracker.mark_last(Effect::EndsFailedBlock);
                    self.tracker.parse(b"", Kind::Read, now);
                    self.tracker.bind(&portal, b"", now);
                    let mut rollback = BytesMut::new();
                    frontend::write_parse(&mut rollback, b"", b"ROLLBACK");
                    frontend::write_bind(&mut rollback, &portal, b"");
                    self.up.replace(h, &rollback);
                    self.swallow_parse_complete += 1;
                    return true;
                }
                None => {}
            }
        }
        self.in_failed_block(h, None, false);
        true
    }
}

/// What the client sent cannot be framed: the session ends.
#[cold]
#[inline(never)]
fn client_broke(e: crate::protocol::framing::FrameError) -> End {
    End::ClientBroke(e.to_string())
}
