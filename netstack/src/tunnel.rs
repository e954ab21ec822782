//! The one place that touches boringtun: a facade over `noise::Tunn` that
//! takes the time as a parameter.
//!
//! boringtun 0.7 reads the clock itself (`Instant::now()` in its timers, its
//! rate limiter and its TAI64N handshake timestamps) and has no `*_at(now)`
//! variants. Its `mock-instant` feature would freeze the clock of every
//! boringtun user in a `cargo test --workspace` build, so it is not used.
//! Instead this facade never calls `Tunn::update_timers`: every WireGuard
//! timer (handshake retry, REKEY_AFTER_TIME, REJECT_AFTER_TIME, passive and
//! persistent keepalive, key erasure) is implemented here from the `now` the
//! caller passes in, and boringtun only does the cryptography: handshake
//! messages, transport encryption, replay windows and cookies. What still
//! reads the real clock inside boringtun: the TAI64N timestamp of a handshake
//! initiation (it only has to grow), the once-per-second reset of the
//! handshake rate limiter and the two-minute rotation of the cookie secret.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use rand::Rng;

use crate::key::{PresharedKey, PrivateKey, PublicKey};
use crate::status::DropReason;

/// WireGuard's timer constants (whitepaper section 6.1).
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshake messages a node verifies per second before it asks initiators
/// for a cookie (boringtun's device uses the same figure). Each handshake is
/// counted twice (once by the node to find the peer, once by the tunnel).
pub(crate) const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// Bytes a transport message adds to its inner packet.
pub(crate) const WG_OVERHEAD: usize = 32;
/// The smallest output buffer boringtun accepts (a handshake initiation).
pub(crate) const MIN_DST: usize = 148;

const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
pub(crate) const MSG_DATA: u8 = 4;

/// The first byte of a WireGuard message (the rest of the type word is zero).
fn message_type(bytes: &[u8]) -> u8 {
    bytes.first().copied().unwrap_or(0)
}

/// Which local peer slot a message addressed to `receiver_index` belongs to.
/// boringtun puts the slot in the top 24 bits of every local index.
pub(crate) fn slot_of_receiver_index(index: u32) -> u32 {
    index >> 8
}

/// The outcome of feeding one datagram to a tunnel.
pub(crate) enum Received<'a> {
    /// An authenticated inner IP packet.
    Ip(&'a [u8]),
    /// A message to send back to the sender's endpoint (handshake response,
    /// the keepalive that confirms a session, or a cookie reply).
    Reply(&'a [u8]),
    /// An authenticated message with nothing to deliver (keepalive, cookie).
    Nothing,
    Dropped(DropReason),
}

impl Received<'_> {
    /// Whether the datagram proved it came from the peer (the node follows
    /// the endpoint of authenticated packets: roaming).
    pub(crate) fn authenticated(&self, sent_type: u8) -> bool {
        match self {
            Received::Ip(_) | Received::Nothing => sent_type != MSG_COOKIE,
            Received::Reply(reply) => message_type(reply) != MSG_COOKIE,
            Received::Dropped(_) => false,
        }
    }
}

pub(crate) fn drop_reason(error: &WireGuardError) -> DropReason {
    match error {
        WireGuardError::DuplicateCounter
        | WireGuardError::InvalidCounter
        | WireGuardError::WrongTai64nTimestamp => DropReason::Replayed,
        WireGuardError::InvalidMac
        | WireGuardError::InvalidAeadTag
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp => DropReason::Unauthenticated,
        WireGuardError::NoCurrentSession | WireGuardError::ConnectionExpired => {
            DropReason::NoSession
        }
        WireGuardError::UnexpectedPacket | WireGuardError::WrongIndex => {
            DropReason::UnexpectedMessage
        }
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType
        | WireGuardError::DestinationBufferTooSmall
        | WireGuardError::LockFailed => DropReason::Malformed,
    }
}

/// A node-level check of a handshake initiation: MAC1 (and, under load, the
/// cookie), then the initiator's static key. Returns the key, a cookie reply
/// to send, or why it was dropped.
pub(crate) enum InitiationCheck<'a> {
    From(PublicKey),
    CookieReply(&'a [u8]),
    Dropped(DropReason),
}

pub(crate) fn check_initiation<'a>(
    limiter: &RateLimiter,
    private: &PrivateKey,
    public: &x25519_dalek::PublicKey,
    from: IpAddr,
    datagram: &[u8],
    dst: &'a mut [u8],
) -> InitiationCheck<'a> {
    match limiter.verify_packet(Some(from), datagram, dst) {
        Ok(Packet::HandshakeInit(init)) => {
            match parse_handshake_anon(private.as_static_secret(), public, &init) {
                Ok(half) => InitiationCheck::From(PublicKey(half.peer_static_public)),
                Err(e) => InitiationCheck::Dropped(drop_reason(&e)),
            }
        }
        Ok(_) => InitiationCheck::Dropped(DropReason::Malformed),
        Err(TunnResult::WriteToNetwork(cookie)) => InitiationCheck::CookieReply(cookie),
        Err(TunnResult::Err(e)) => InitiationCheck::Dropped(drop_reason(&e)),
        Err(_) => InitiationCheck::Dropped(DropReason::Malformed),
    }
}

/// One peer's WireGuard state: boringtun's `Tunn` plus the timers, in the
/// caller's time.
pub(crate) struct Tunnel {
    tunn: Tunn,
    private: PrivateKey,
    peer: PublicKey,
    preshared: Option<PresharedKey>,
    slot: u32,
    limiter: Arc<RateLimiter>,
    created: Instant,
    persistent_keepalive: Option<Duration>,
    /// When the newest session was established.
    session_started: Option<Instant>,
    we_initiated: bool,
    /// The start of the current series of handshake attempts.
    attempt_started: Option<Instant>,
    last_initiation: Option<Instant>,
    /// REKEY_TIMEOUT plus jitter for the next retry.
    retry_after: Duration,
    /// Time of the last give-up: triggers need fresh traffic after it.
    gave_up: Option<Instant>,
    /// The first data sent since the last authenticated packet received:
    /// if nothing comes back within KEEPALIVE + REKEY_TIMEOUT, handshake.
    unanswered_since: Option<Instant>,
    last_sent: Option<Instant>,
    last_received: Option<Instant>,
    last_data_sent: Option<Instant>,
    last_data_received: Option<Instant>,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) last_handshake: Option<Instant>,
    /// We answered an initiation; no transport message has confirmed it yet.
    unconfirmed: bool,
    /// When transport data we could not decrypt last started a handshake
    /// (see [`Tunnel::handshake_for_stale_session`]).
    stale_kick: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum TimerAction {
    GiveUp,
    SendInitiation,
    StartHandshake,
    SilenceHandshake,
    EraseKeys,
    Keepalive,
}

fn non_empty(bytes: &[u8]) -> Option<&[u8]> {
    (!bytes.is_empty()).then_some(bytes)
}

fn later(a: Option<Instant>, b: Option<Instant>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a > b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

impl Tunnel {
    pub(crate) fn new(
        private: &PrivateKey,
        peer: PublicKey,
        preshared: Option<PresharedKey>,
        persistent_keepalive: Option<u16>,
        slot: u32,
        limiter: Arc<RateLimiter>,
        now: Instant,
    ) -> Tunnel {
        let tunn = Self::fresh_tunn(private, peer, preshared.as_ref(), slot, &limiter);
        Tunnel {
            tunn,
            private: private.clone(),
            peer,
            preshared,
            slot,
            limiter,
            created: now,
            persistent_keepalive: persistent_keepalive
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s))),
            session_started: None,
            we_initiated: false,
            attempt_started: None,
            last_initiation: None,
            retry_after: REKEY_TIMEOUT,
            gave_up: None,
            unanswered_since: None,
            last_sent: None,
            last_received: None,
            last_data_sent: None,
            last_data_received: None,
            rx_bytes: 0,
            tx_bytes: 0,
            last_handshake: None,
            unconfirmed: false,
            stale_kick: None,
        }
    }

    fn fresh_tunn(
        private: &PrivateKey,
        peer: PublicKey,
        preshared: Option<&PresharedKey>,
        slot: u32,
        limiter: &Arc<RateLimiter>,
    ) -> Tunn {
        Tunn::new(
            private.as_static_secret().clone(),
            peer.to_x25519(),
            preshared.map(|k| k.0),
            None,
            slot,
            Some(limiter.clone()),
        )
    }

    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    /// Whether this tunnel's keys match (a new preshared key needs a new
    /// tunnel; everything else is updated in place).
    pub(crate) fn same_keys(&self, preshared: &Option<PresharedKey>) -> bool {
        &self.preshared == preshared
    }

    pub(crate) fn set_persistent_keepalive(&mut self, seconds: Option<u16>) {
        self.persistent_keepalive = seconds
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(u64::from(s)));
    }

    /// Whether a session is usable for sending at `now`.
    fn session_usable(&self, now: Instant) -> bool {
        self.session_started
            .is_some_and(|t| now.saturating_duration_since(t) < REJECT_AFTER_TIME)
    }

    fn note_sent(&mut self, now: Instant, packet: &[u8]) {
        self.last_sent = Some(now);
        match message_type(packet) {
            MSG_INIT => {
                self.last_initiation = Some(now);
                self.attempt_started.get_or_insert(now);
                self.retry_after =
                    REKEY_TIMEOUT + Duration::from_millis(rand::rng().random_range(0..334));
            }
            MSG_DATA if packet.len() > WG_OVERHEAD => {
                self.last_data_sent = Some(now);
                self.unanswered_since.get_or_insert(now);
            }
            _ => {}
        }
    }

    fn mark_received(&mut self, now: Instant) {
        self.last_received = Some(now);
        self.unanswered_since = None;
    }

    /// A transport message decrypted: the session it used is confirmed.
    fn mark_transport_received(&mut self, now: Instant) {
        self.mark_received(now);
        if self.unconfirmed {
            self.unconfirmed = false;
            self.last_handshake = self.session_started;
        }
    }

    fn session_established(&mut self, now: Instant, we_initiated: bool) {
        self.session_started = Some(now);
        // A responder's session is confirmed by the initiator's first
        // transport message (a wrong preshared key only shows there).
        if we_initiated {
            self.last_handshake = Some(now);
        }
        self.unconfirmed = !we_initiated;
        self.we_initiated = we_initiated;
        self.attempt_started = None;
        self.gave_up = None;
    }

    /// Encrypt one inner IP packet. Returns the datagram to send, if any (a
    /// handshake initiation when there is no session yet: boringtun queues
    /// the packet and sends it once the handshake completes).
    pub(crate) fn encapsulate<'a>(
        &mut self,
        now: Instant,
        packet: &[u8],
        dst: &'a mut [u8],
    ) -> Result<Option<&'a [u8]>, DropReason> {
        if self.session_started.is_some() && !self.session_usable(now) {
            // The session is past REJECT_AFTER_TIME: never use it. Start a
            // handshake (the timer sends it, once); the packet is lost and
            // TCP retransmits it.
            if self.attempt_started.is_none() {
                self.attempt_due_now(now);
            }
            return Err(DropReason::SessionExpired);
        }
        let rekey = self.we_initiated
            && self.attempt_started.is_none()
            && self
                .session_started
                .is_some_and(|t| now.saturating_duration_since(t) >= REKEY_AFTER_TIME);
        match self.tunn.encapsulate(packet, dst) {
            TunnResult::WriteToNetwork(out) => {
                let out: &'a [u8] = out;
                self.note_sent(now, out);
                if message_type(out) == MSG_DATA {
                    self.tx_bytes += packet.len() as u64;
                }
                if rekey {
                    // Send the data on the old session; the timer sends the
                    // new initiation at once.
                    self.attempt_due_now(now);
                }
                Ok(Some(out))
            }
            TunnResult::Done => Ok(None),
            TunnResult::Err(e) => Err(drop_reason(&e)),
            _ => Ok(None),
        }
    }

    /// The peer sent transport data on a session this side does not have
    /// (this node restarted, or erased the keys): it will keep using that
    /// session until its KEEPALIVE + REKEY_TIMEOUT silence timer runs out
    /// (15 s). Start a handshake now instead, unless one is under way; at
    /// most once per REKEY_TIMEOUT, so forged packets cannot make a storm.
    /// Returns whether a handshake was started.
    pub(crate) fn handshake_for_stale_session(&mut self, now: Instant) -> bool {
        if self.attempt_started.is_some()
            || self
                .stale_kick
                .is_some_and(|t| now.saturating_duration_since(t) < REKEY_TIMEOUT)
        {
            return false;
        }
        self.stale_kick = Some(now);
        self.attempt_due_now(now);
        true
    }

    fn attempt_due_now(&mut self, now: Instant) {
        self.attempt_started = Some(now);
        self.last_initiation = None;
    }

    /// A handshake initiation. If boringtun cannot write one, the attempt
    /// still counts, so the retry timer moves on.
    fn initiate<'a>(&mut self, now: Instant, dst: &'a mut [u8]) -> &'a [u8] {
        self.attempt_started.get_or_insert(now);
        self.last_initiation = Some(now);
        self.last_sent = Some(now);
        match self.tunn.format_handshake_initiation(dst, true) {
            TunnResult::WriteToNetwork(out) => {
                let out: &'a [u8] = out;
                self.note_sent(now, out);
                out
            }
            _ => &[],
        }
    }

    /// Feed one datagram addressed to this peer.
    pub(crate) fn decapsulate<'a>(
        &mut self,
        now: Instant,
        from: IpAddr,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> Received<'a> {
        let kind = message_type(datagram);
        if kind == MSG_DATA && self.session_started.is_some() && !self.session_usable(now) {
            return Received::Dropped(DropReason::SessionExpired);
        }
        match self.tunn.decapsulate(Some(from), datagram, dst) {
            TunnResult::WriteToNetwork(out) => {
                let out: &'a [u8] = out;
                match (kind, message_type(out)) {
                    (MSG_INIT, MSG_RESPONSE) => {
                        self.mark_received(now);
                        self.session_established(now, false);
                    }
                    (MSG_RESPONSE, MSG_DATA) => {
                        self.mark_received(now);
                        self.session_established(now, true);
                    }
                    _ => {}
                }
                if message_type(out) != MSG_COOKIE {
                    self.note_sent(now, out);
                }
                Received::Reply(out)
            }
            TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                self.mark_transport_received(now);
                self.last_data_received = Some(now);
                self.rx_bytes += packet.len() as u64;
                Received::Ip(packet)
            }
            TunnResult::Done => {
                if kind == MSG_DATA {
                    self.mark_transport_received(now);
                }
                Received::Nothing
            }
            TunnResult::Err(e) => Received::Dropped(drop_reason(&e)),
        }
    }

    /// After a handshake completes, boringtun holds the packets queued while
    /// it had no session: take them one by one.
    pub(crate) fn flush_queued<'a>(&mut self, now: Instant, dst: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn.decapsulate(None, &[], dst) {
            TunnResult::WriteToNetwork(out) => {
                let out: &'a [u8] = out;
                self.note_sent(now, out);
                if message_type(out) == MSG_DATA {
                    self.tx_bytes += (out.len() - WG_OVERHEAD) as u64;
                }
                Some(out)
            }
            _ => None,
        }
    }

    /// The earliest timer and what it does then. Every action changes the
    /// state so that the same plan never comes back: `poll_timeout` can never
    /// report a deadline that `handle_timers` then ignores.
    fn plan(&self) -> Option<(Instant, TimerAction)> {
        if let Some(started) = self.attempt_started {
            let give_up = started + REKEY_ATTEMPT_TIME;
            let retry = self
                .last_initiation
                .map_or(started, |sent| sent + self.retry_after);
            return Some(if retry < give_up {
                (retry, TimerAction::SendInitiation)
            } else {
                (give_up, TimerAction::GiveUp)
            });
        }
        let mut best: Option<(Instant, TimerAction)> = None;
        let mut consider = |at: Instant, action: TimerAction| {
            if best.as_ref().is_none_or(|(t, _)| at < *t) {
                best = Some((at, action));
            }
        };
        if let Some(session) = self.session_started {
            let usable_until = session + REJECT_AFTER_TIME;
            consider(session + REJECT_AFTER_TIME * 3, TimerAction::EraseKeys);
            if self.we_initiated && self.rekey_on_send_armed(session) {
                consider(session + REKEY_AFTER_TIME, TimerAction::StartHandshake);
            }
            if self.we_initiated && self.rekey_on_receive_armed(session) {
                consider(
                    session + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT,
                    TimerAction::StartHandshake,
                );
            }
            if let Some(sent) = self.unanswered_since {
                consider(
                    sent + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT,
                    TimerAction::SilenceHandshake,
                );
            }
            if later(self.last_data_received, self.last_sent) {
                if let Some(received) = self.last_data_received {
                    if received + KEEPALIVE_TIMEOUT < usable_until {
                        consider(received + KEEPALIVE_TIMEOUT, TimerAction::Keepalive);
                    }
                }
            }
        }
        if let Some(interval) = self.persistent_keepalive {
            let base = self.last_sent.unwrap_or(self.created);
            match self.session_started {
                Some(session) if base + interval < session + REJECT_AFTER_TIME => {
                    consider(base + interval, TimerAction::Keepalive)
                }
                _ if self.last_sent.is_none() => consider(base, TimerAction::StartHandshake),
                _ => consider(base + REKEY_TIMEOUT, TimerAction::StartHandshake),
            }
        }
        best
    }

    /// The next instant at which `handle_timers` has something to do.
    pub(crate) fn next_timer(&self) -> Option<Instant> {
        self.plan().map(|(at, _)| at)
    }

    fn rekey_on_send_armed(&self, session: Instant) -> bool {
        self.last_data_sent.is_some_and(|t| t > session) && later(self.last_data_sent, self.gave_up)
    }

    fn rekey_on_receive_armed(&self, session: Instant) -> bool {
        self.last_data_received.is_some_and(|t| t > session)
            && later(self.last_data_received, self.gave_up)
    }

    /// Run the WireGuard timers due at `now`. Returns a message to send, if
    /// any; call again until it returns `None`.
    pub(crate) fn handle_timers<'a>(
        &mut self,
        now: Instant,
        dst: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        loop {
            let (at, action) = self.plan()?;
            if at > now {
                return None;
            }
            match action {
                TimerAction::GiveUp => {
                    self.attempt_started = None;
                    self.last_initiation = None;
                    self.gave_up = Some(now);
                    tracing::debug!(peer = %self.peer, "handshake gave up after REKEY_ATTEMPT_TIME");
                }
                TimerAction::SendInitiation => return non_empty(self.initiate(now, dst)),
                TimerAction::StartHandshake | TimerAction::SilenceHandshake => {
                    if matches!(action, TimerAction::SilenceHandshake) {
                        tracing::debug!(peer = %self.peer, "no answer for KEEPALIVE + REKEY_TIMEOUT: handshake");
                        self.unanswered_since = None;
                    }
                    self.attempt_started = Some(now);
                    return non_empty(self.initiate(now, dst));
                }
                TimerAction::EraseKeys => {
                    // Nothing exchanged for REJECT_AFTER_TIME * 3: erase all keys.
                    self.tunn = Self::fresh_tunn(
                        &self.private,
                        self.peer,
                        self.preshared.as_ref(),
                        self.slot,
                        &self.limiter,
                    );
                    self.session_started = None;
                }
                TimerAction::Keepalive => return non_empty(self.keepalive(now, dst)),
            }
        }
    }

    /// An empty transport message. If it cannot be sent, the attempt still
    /// counts, so the timer moves on.
    fn keepalive<'a>(&mut self, now: Instant, dst: &'a mut [u8]) -> &'a [u8] {
        self.last_sent = Some(now);
        match self.tunn.encapsulate(&[], dst) {
            TunnResult::WriteToNetwork(out) => {
                let out: &'a [u8] = out;
                self.note_sent(now, out);
                out
            }
            _ => &[],
        }
    }
}
