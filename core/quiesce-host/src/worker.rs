//! One thread per writer: calls under deadlines, and a hold-limit watchdog that needs nobody.
//!
//! Writers are synchronous (plugins never share the host's tokio runtime) and must never be
//! called concurrently, so each writer gets a thread of its own that owns it and runs one call at
//! a time from a queue. Callers wait for the answer with a deadline; a call that outlives it is
//! abandoned — the thread cannot be killed — and the writer is reported stuck until it returns.
//!
//! The watchdog lives in the same thread: while the writer is frozen, the thread waits for its
//! next call only until the hold limit; past it, it thaws the writer on its own. No caller, no
//! runtime, no network is needed for a writer to come back — which is the promise "no writer is
//! ever left frozen". An `Abort` queued behind a hung call runs as soon as that call returns.

use abi_stable::std_types::{ROption, RResult, RString};
use quiesce_abi::{CallContext, ErrorKind, WriterBox};
use quiesce_proto::{CallFailure, CallKind, FailureKind, Reports, WriterCall, WriterMetadata};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Something that can carry out writer calls synchronously: a plugin's writer object, or an
/// application's writer reached over D-Bus. A failure's reason is the backend's own words; the
/// worker puts the writer and the call in front of it.
pub trait Backend: Send + 'static {
    fn call(
        &mut self,
        call: &WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure>;
}

/// A plugin writer behind the stable ABI.
pub struct PluginBackend(pub WriterBox);

impl Backend for PluginBackend {
    fn call(
        &mut self,
        call: &WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        let mut ctx = CallContext {
            set_id: RString::from(set_id),
            budget_ms: budget.as_millis().try_into().unwrap_or(u64::MAX),
            snapshot_path: ROption::RNone,
            outcome: ROption::RNone,
        };
        let w = &mut self.0;
        let result = match call {
            WriterCall::Prepare => w.prepare(&ctx),
            WriterCall::Freeze => w.freeze(&ctx),
            WriterCall::Thaw => w.thaw(&ctx),
            WriterCall::PostSnapshot { snapshot } => {
                ctx.snapshot_path = ROption::RSome(RString::from(snapshot.path.as_str()));
                w.post_snapshot(&ctx)
            }
            WriterCall::Abort => w.abort(&ctx),
            WriterCall::Complete { outcome } => {
                ctx.outcome = ROption::RSome(RString::from(outcome.as_str()));
                w.complete(&ctx)
            }
        };
        match result {
            RResult::ROk(reports) => Ok(reports
                .into_iter()
                .map(|t| (t.0.into_string(), t.1.into_string()))
                .collect()),
            RResult::RErr(e) => {
                let kind = match e.kind {
                    ErrorKind::Failed => FailureKind::Error,
                    ErrorKind::Panicked => FailureKind::Panicked,
                    ErrorKind::InvalidConfig => FailureKind::RefusedConfig,
                };
                Err(CallFailure::new(kind, e.message.into_string()))
            }
        }
    }
}

/// The failure of a call, in the host's words: the writer and the call named, and what to do.
fn failure(writer: &str, call: CallKind, backend: CallFailure) -> CallFailure {
    let CallFailure { kind, reason } = backend;
    let reason = match kind {
        FailureKind::Panicked => format!("writer {writer}: panicked in {call}: {reason}"),
        FailureKind::RefusedConfig => {
            format!("writer {writer}: {call} refused: its configuration was refused: {reason}")
        }
        FailureKind::Error | FailureKind::TimedOut | FailureKind::Lost => {
            format!("writer {writer}: {call} failed: {reason}")
        }
    };
    CallFailure::new(kind, reason)
}

fn timed_out(writer: &str, call: CallKind, budget: Duration) -> CallFailure {
    CallFailure::timed_out(format!(
        "writer {writer}: no answer to {call} within {} ms; the call was abandoned and the writer is aborted as soon as it returns",
        budget.as_millis()
    ))
}

fn stuck(writer: &str, call: CallKind, stuck: Duration) -> CallFailure {
    CallFailure::error(format!(
        "writer {writer}: still stuck in {call} from an earlier call ({} ms); it is not called again until that returns — restart the host to reload its plugin",
        stuck.as_millis()
    ))
}

fn gone(writer: &str) -> CallFailure {
    CallFailure::lost(format!("writer {writer}: its worker thread has stopped"))
}

/// Where a writer stands, as the host last saw it (the `State` property on D-Bus).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Idle,
    Prepared,
    Frozen,
    Thawed,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Prepared => "prepared",
            State::Frozen => "frozen",
            State::Thawed => "thawed",
            State::Failed => "failed",
        }
    }

    fn after(call: CallKind, ok: bool, before: State) -> State {
        if !ok {
            return State::Failed;
        }
        match call {
            CallKind::Prepare => State::Prepared,
            CallKind::Freeze => State::Frozen,
            CallKind::Thaw => State::Thawed,
            CallKind::PostSnapshot => before,
            CallKind::Abort | CallKind::Complete => State::Idle,
        }
    }
}

/// The call a worker is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub call: CallKind,
    /// The hold-limit watchdog's own thaw, not a caller's.
    pub by_watchdog: bool,
    pub since: Instant,
    /// When its caller stops waiting: past it, the writer is stuck.
    pub deadline: Instant,
}

/// Who holds a frozen writer: a snapshot set, or an operator's diagnostic `Writer1.Freeze`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Set(String),
    Diagnosis,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Set(id) => write!(f, "set {id}"),
            Holder::Diagnosis => f.write_str("a diagnostic freeze (Writer1.Freeze)"),
        }
    }
}

/// What the worker is doing, published for callers and observers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// The call running now, and since when.
    pub busy: Option<Busy>,
    /// Calls not yet answered: the one running and those waiting behind it. (Counted until
    /// answered, not until taken off the queue: a worker between taking a call and marking it
    /// busy would otherwise look settled.)
    pub pending: usize,
    /// Since when the writer has been frozen — its first freeze, by whatever path; another
    /// freeze never restarts it — if it is.
    pub frozen_since: Option<Instant>,
    /// Who holds it frozen.
    pub held_by: Option<Holder>,
    /// How often the watchdog thawed this writer on its own.
    pub watchdog_thaws: u64,
    /// The last call's failure, if the last call failed.
    pub last_error: Option<String>,
}

/// What a caller asks of a writer's thread.
#[derive(Debug)]
enum Request {
    /// A snapshot set's call.
    Set { call: WriterCall, set_id: String },
    /// An operator's diagnostic freeze or thaw.
    Diagnose(WriterCall),
    /// Let go of whatever holds the writer (the host is shutting down).
    Release,
}

impl Request {
    fn kind(&self) -> CallKind {
        match self {
            Request::Set { call, .. } | Request::Diagnose(call) => call.kind(),
            Request::Release => CallKind::Abort,
        }
    }
}

struct Job {
    request: Request,
    budget: Duration,
    reply: oneshot::Sender<Result<Reports, CallFailure>>,
}

/// The handle callers use; the writer itself lives on its worker thread.
#[derive(Debug)]
pub struct WriterHandle {
    pub metadata: WriterMetadata,
    /// Where the writer comes from, for messages: `plugin hello (/path/libhello.so)`.
    pub origin: String,
    jobs: mpsc::Sender<Job>,
    status: Arc<watch::Sender<Status>>,
}

impl WriterHandle {
    /// Starts the writer's worker thread.
    pub fn spawn(
        metadata: WriterMetadata,
        origin: String,
        backend: Box<dyn Backend>,
        hold_limit: Duration,
    ) -> Arc<WriterHandle> {
        let (jobs, rx) = mpsc::channel();
        let status = Arc::new(watch::Sender::new(Status::default()));
        let worker = Worker {
            writer: metadata.id.clone(),
            backend,
            jobs: rx,
            status: status.clone(),
            hold_limit,
            released: None,
            retry_at: None,
            metrics: crate::metrics::writer(&metadata.id),
        };
        std::thread::Builder::new()
            .name(format!("writer-{}", metadata.id))
            .spawn(move || worker.run())
            .expect("spawning a writer thread");
        Arc::new(WriterHandle {
            metadata,
            origin,
            jobs,
            status,
        })
    }

    pub fn id(&self) -> &str {
        &self.metadata.id
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The call the writer has been stuck in past its deadline, and for how long it has been
    /// running. A call still within its deadline is not stuck: new calls queue behind it.
    pub fn stuck(&self, now: Instant) -> Option<(CallKind, Duration)> {
        let s = self.status.borrow();
        s.busy
            .filter(|b| now > b.deadline)
            .map(|b| (b.call, now.saturating_duration_since(b.since)))
    }

    /// Waits until the worker has nothing running or queued (for shutdown and tests).
    pub async fn settled(&self) {
        let mut rx = self.status.subscribe();
        let _ = rx.wait_for(|s| s.busy.is_none() && s.pending == 0).await;
    }

    /// Calls the writer for set `set_id` and waits at most `budget` for its answer.
    pub async fn call(
        &self,
        call: WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        self.start_call(call, set_id, budget).answer().await
    }

    /// A diagnostic `Freeze` or `Thaw` outside any set (`Writer1` on D-Bus). It never touches
    /// a writer a set holds, and a writer it freezes is held by it — no set starts with it —
    /// until it is thawed or its hold limit passes.
    pub async fn diagnose(
        &self,
        call: WriterCall,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        self.queue(Request::Diagnose(call), budget).answer().await
    }

    /// Lets go of the writer whoever holds it: aborts a set's hold, thaws a diagnostic one.
    pub async fn release(&self, budget: Duration) -> Result<Reports, CallFailure> {
        self.queue(Request::Release, budget).answer().await
    }

    /// Queues a call of set `set_id` at once, in the order of the calls made, and returns its
    /// pending answer.
    ///
    /// Queuing is synchronous so that calls reach the writer in exactly the order the driver
    /// made them, even when their answers are awaited on different tasks: a set's closing
    /// `complete` can never overtake the next set's `prepare`.
    ///
    /// Releasing calls (thaw, abort, complete) are always queued, even behind a call that hangs,
    /// so a writer that eventually returns from a hung freeze is still released. Other calls to a
    /// writer that is still busy with an abandoned call are refused at once.
    pub fn start_call(&self, call: WriterCall, set_id: &str, budget: Duration) -> PendingCall {
        self.queue(
            Request::Set {
                call,
                set_id: set_id.to_string(),
            },
            budget,
        )
    }

    fn queue(&self, request: Request, budget: Duration) -> PendingCall {
        let writer = self.metadata.id.clone();
        let kind = request.kind();
        let pending = |answer| PendingCall {
            writer: writer.clone(),
            kind,
            budget,
            answer,
        };
        if !kind.releases() {
            if let Some((stuck_in, how_long)) = self.stuck(Instant::now()) {
                return pending(Err(stuck(&writer, stuck_in, how_long)));
            }
        }
        let (reply, answer) = oneshot::channel();
        self.status.send_modify(|s| s.pending += 1);
        let job = Job {
            request,
            budget,
            reply,
        };
        if self.jobs.send(job).is_err() {
            self.status
                .send_modify(|s| s.pending = s.pending.saturating_sub(1));
            return pending(Err(gone(&writer)));
        }
        pending(Ok(answer))
    }
}

/// A call queued to a writer, whose answer is still to come.
#[derive(Debug)]
pub struct PendingCall {
    writer: String,
    kind: CallKind,
    budget: Duration,
    answer: Result<oneshot::Receiver<Result<Reports, CallFailure>>, CallFailure>,
}

impl PendingCall {
    /// Waits at most the call's budget for the writer's answer.
    pub async fn answer(self) -> Result<Reports, CallFailure> {
        let PendingCall {
            writer,
            kind,
            budget,
            answer,
        } = self;
        let answer = answer?;
        match tokio::time::timeout(budget, answer).await {
            Ok(Ok(Ok(reports))) => Ok(reports),
            // The worker's own refusals already name the writer.
            Ok(Ok(Err(failure))) => Err(failure),
            Ok(Err(_)) => Err(gone(&writer)),
            Err(_) => {
                tracing::error!(writer = %writer, call = %kind, budget_ms = budget.as_millis() as u64,
                    "writer did not answer within its deadline; the call is abandoned");
                Err(timed_out(&writer, kind, budget))
            }
        }
    }
}

/// How a set's hold on the writer ended, to explain a thaw that comes after it.
#[derive(Debug, Clone)]
struct Released {
    set: String,
    at: Instant,
    how: ReleasedBy,
}

#[derive(Debug, Clone)]
enum ReleasedBy {
    /// The hold limit passed: the watchdog thawed it.
    Watchdog { held: Duration },
    /// The set aborted it (its own abort, or its lease lapsing on this node).
    Abort,
    /// A newer set's call took the writer over (the set's broker was gone).
    Superseded { by: String },
    /// The host let go of it (shutdown).
    Release,
    /// The set thawed it.
    Thaw,
}

struct Worker {
    writer: String,
    backend: Box<dyn Backend>,
    jobs: mpsc::Receiver<Job>,
    status: Arc<watch::Sender<Status>>,
    hold_limit: Duration,
    released: Option<Released>,
    /// After a watchdog thaw that failed: when to try again.
    retry_at: Option<Instant>,
    /// Atomics only: recorded between a freeze and its thaw too.
    metrics: Arc<crate::metrics::WriterMetrics>,
}

/// How long the watchdog waits before it tries a failed thaw again.
const WATCHDOG_RETRY: Duration = Duration::from_secs(1);

impl Worker {
    fn run(mut self) {
        loop {
            let frozen_since = self.status.borrow().frozen_since;
            let job = match frozen_since {
                Some(since) => {
                    let due = (since + self.hold_limit).max(self.retry_at.unwrap_or(since));
                    let left = due.saturating_duration_since(Instant::now());
                    match self.jobs.recv_timeout(left) {
                        Ok(job) => job,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.watchdog_thaw();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            // The host is going away: never leave the writer frozen behind it.
                            self.watchdog_thaw();
                            return;
                        }
                    }
                }
                None => match self.jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
            };
            self.run_job(job);
        }
    }

    fn held_by(&self) -> Option<Holder> {
        self.status.borrow().held_by.clone()
    }

    fn run_job(&mut self, job: Job) {
        let result = match job.request {
            Request::Set { call, set_id } => self.set_call(call, &set_id, job.budget),
            Request::Diagnose(call) => self.diagnostic_call(call, job.budget),
            Request::Release => self.release(job.budget),
        };
        self.status
            .send_modify(|s| s.pending = s.pending.saturating_sub(1));
        // The caller may have given up (deadline passed): then nobody listens, which is fine.
        let _ = job.reply.send(result);
    }

    /// A set's call, under the hold rules: a diagnostic freeze keeps every set out; a newer
    /// set takes the writer over from an older one; a thaw answers OK only for the set that
    /// holds the writer frozen now — the proof that it was held from its freeze until then.
    fn set_call(
        &mut self,
        call: WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        let kind = call.kind();
        let holder = self.held_by();
        let ours = holder.as_ref() == Some(&Holder::Set(set_id.to_string()));
        match (&holder, kind) {
            (Some(Holder::Diagnosis), CallKind::Prepare | CallKind::Freeze) => {
                return Err(CallFailure::error(format!(
                    "writer {}: frozen by a diagnostic freeze (Writer1.Freeze); no set may use it until it is thawed (Writer1.Thaw) or its hold limit passes",
                    self.writer
                )));
            }
            (Some(Holder::Set(other)), CallKind::Prepare | CallKind::Freeze) if !ours => {
                // A new set would not start while the older one ran on its broker: that broker
                // is gone (killed and restarted). Its lease would release the writer; the new
                // set does it now, so that the old lease lapsing later cannot undo the new set.
                let other = other.clone();
                tracing::warn!(writer = %self.writer, old = %other, new = set_id,
                    "a newer set takes over a writer still held by an older set: aborting the older set's hold");
                let _ = self.invoke(&WriterCall::Abort, &other, budget);
                self.let_go(&other, ReleasedBy::Superseded { by: set_id.into() });
            }
            (_, CallKind::Thaw) if !ours => {
                let thawed_already = self
                    .released
                    .as_ref()
                    .is_some_and(|r| r.set == set_id && matches!(r.how, ReleasedBy::Thaw));
                // A thaw is idempotent; a thaw that finds the writer let go otherwise says so.
                return if thawed_already {
                    Ok(Reports::new())
                } else {
                    Err(self.not_held(set_id))
                };
            }
            (Some(_), CallKind::Abort) if !ours => {
                // Nothing of this set is left on the writer: another set or a diagnosis
                // holds it now, and aborting would undo that one.
                return Ok(Reports::new());
            }
            _ => {}
        }
        let started = Instant::now();
        let result = self.invoke(&call, set_id, budget);
        match kind {
            // Even a failed freeze may have half-frozen the writer: the watchdog covers it.
            // A second freeze of the same set never restarts the hold clock.
            CallKind::Freeze if !ours => self.hold(Holder::Set(set_id.into()), started),
            // A thaw or abort that failed may have left the writer frozen: it stays held, and
            // the watchdog tries again at the hold limit.
            CallKind::Thaw if result.is_ok() => self.let_go(set_id, ReleasedBy::Thaw),
            CallKind::Abort if ours && result.is_ok() => self.let_go(set_id, ReleasedBy::Abort),
            _ => {}
        }
        result
    }

    /// The operator's `Freeze`/`Thaw`, which never touches a writer a set holds.
    fn diagnostic_call(
        &mut self,
        call: WriterCall,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        let holder = self.held_by();
        if let Some(Holder::Set(set)) = &holder {
            return Err(CallFailure::error(format!(
                "writer {}: held frozen by set {set}; a diagnostic {} must wait until that set releases it",
                self.writer,
                call.kind()
            )));
        }
        match call.kind() {
            // Frozen for diagnosis already: the first freeze's hold clock goes on.
            CallKind::Freeze if holder.is_some() => Ok(Reports::new()),
            CallKind::Freeze => {
                let started = Instant::now();
                let result = self.invoke(&call, "diagnosis", budget);
                self.hold(Holder::Diagnosis, started);
                result
            }
            CallKind::Thaw => {
                let result = self.invoke(&call, "diagnosis", budget);
                if result.is_ok() {
                    self.clear_hold();
                }
                result
            }
            other => Err(CallFailure::error(format!(
                "writer {}: {other} is not a diagnostic call (only freeze and thaw are)",
                self.writer
            ))),
        }
    }

    fn release(&mut self, budget: Duration) -> Result<Reports, CallFailure> {
        match self.held_by() {
            None => Ok(Reports::new()),
            Some(Holder::Diagnosis) => {
                let result = self.invoke(&WriterCall::Thaw, "diagnosis", budget);
                self.clear_hold();
                result
            }
            Some(Holder::Set(set)) => {
                let result = self.invoke(&WriterCall::Abort, &set, budget);
                self.let_go(&set, ReleasedBy::Release);
                result
            }
        }
    }

    /// Why a thaw of `set` finds the writer not held for it.
    fn not_held(&self, set: &str) -> CallFailure {
        let w = &self.writer;
        match self.released.as_ref().filter(|r| r.set == set) {
            Some(Released {
                how: ReleasedBy::Watchdog { held },
                at,
                ..
            }) => CallFailure::timed_out(format!(
                "writer {w}: the hold limit thawed it {} ms after its freeze, {} ms before this thaw of set {set} arrived: it may have written after its freeze point, so the snapshot cannot count on it",
                held.as_millis(),
                at.elapsed().as_millis()
            )),
            Some(Released { how, at, .. }) => {
                let what = match how {
                    ReleasedBy::Superseded { by } => format!("set {by} took it over"),
                    ReleasedBy::Release => "the host let go of it".into(),
                    ReleasedBy::Thaw => "it was thawed".into(),
                    _ => "the set aborted it (its lease lapsed on this node, or it failed)".into(),
                };
                CallFailure::lost(format!(
                    "writer {w}: released {} ms before this thaw of set {set} ({what}): it was not held until the snapshot",
                    at.elapsed().as_millis()
                ))
            }
            None => CallFailure::error(format!(
                "writer {w}: not frozen for set {set}, so it cannot thaw for it (was its freeze lost?)"
            )),
        }
    }

    fn hold(&mut self, holder: Holder, since: Instant) {
        self.status.send_modify(|s| {
            s.frozen_since.get_or_insert(since);
            s.held_by = Some(holder);
        });
    }

    fn clear_hold(&mut self) {
        self.status.send_modify(|s| {
            s.frozen_since = None;
            s.held_by = None;
        });
    }

    /// The writer is no longer held for `set`; remember how, for a thaw that comes later.
    fn let_go(&mut self, set: &str, how: ReleasedBy) {
        if self.held_by() == Some(Holder::Set(set.to_string())) {
            self.released = Some(Released {
                set: set.to_string(),
                at: Instant::now(),
                how,
            });
        }
        self.clear_hold();
    }

    /// Runs one call of the backend, publishing what the worker is doing.
    fn invoke(
        &mut self,
        call: &WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        let started = Instant::now();
        let kind = call.kind();
        self.status.send_modify(|s| {
            s.busy = Some(Busy {
                call: kind,
                by_watchdog: false,
                since: started,
                deadline: started + budget,
            });
        });
        let result = self.call_backend(call, set_id, budget);
        self.metrics.call(kind, started.elapsed());
        let result = result
            .map_err(|backend| failure(&self.writer, kind, backend))
            .and_then(|reports| {
                let size: usize = reports.iter().map(|(k, v)| k.len() + v.len()).sum();
                if size <= quiesce_proto::limits::REPORTS_BYTES {
                    return Ok(reports);
                }
                Err(CallFailure::error(format!(
                    "writer {}: {kind} reported {size} bytes, more than the {} bytes a call may report (README, \"Limits\"): the writer must report less",
                    self.writer,
                    quiesce_proto::limits::REPORTS_BYTES
                )))
            });
        self.status.send_modify(|s| {
            s.busy = None;
            s.state = State::after(kind, result.is_ok(), s.state);
            s.last_error = result.as_ref().err().map(|e| e.reason.clone());
        });
        result
    }

    /// Calls the backend; a panic (a bug in a backend that is not an SDK plugin, whose panics the
    /// SDK already catches) becomes an error instead of ending this thread.
    fn call_backend(
        &mut self,
        call: &WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        let backend = &mut self.backend;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            backend.call(call, set_id, budget)
        }))
        .unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(CallFailure::panicked(message))
        })
    }

    fn watchdog_thaw(&mut self) {
        let (holder, since) = {
            let s = self.status.borrow();
            (s.held_by.clone(), s.frozen_since)
        };
        let set_id = match &holder {
            Some(Holder::Set(id)) => id.clone(),
            _ => "diagnosis".into(),
        };
        tracing::warn!(writer = %self.writer, held_by = ?holder,
            hold_limit_ms = self.hold_limit.as_millis() as u64,
            "hold limit reached: the host thaws the writer on its own");
        let started = Instant::now();
        self.status.send_modify(|s| {
            s.busy = Some(Busy {
                call: CallKind::Thaw,
                by_watchdog: true,
                since: started,
                deadline: started + self.hold_limit,
            })
        });
        let result = self.call_backend(&WriterCall::Thaw, &set_id, self.hold_limit);
        self.metrics.call(CallKind::Thaw, started.elapsed());
        self.metrics.watchdog_thaw();
        if let Err(e) = &result {
            tracing::error!(writer = %self.writer, error = %e, "watchdog thaw failed");
        }
        let held = since
            .map(|t| started.saturating_duration_since(t))
            .unwrap_or_default();
        if result.is_ok() {
            self.retry_at = None;
            self.let_go(&set_id, ReleasedBy::Watchdog { held });
        } else {
            // Still held, perhaps still frozen: try again shortly, not in a tight loop.
            self.retry_at = Some(Instant::now() + WATCHDOG_RETRY);
        }
        self.status.send_modify(|s| {
            s.busy = None;
            s.state = State::after(CallKind::Thaw, result.is_ok(), s.state);
            s.watchdog_thaws += 1;
        });
    }
}
