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
use quiesce_proto::{Reports, WriterMetadata};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// A call to a writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Prepare,
    Freeze,
    Thaw,
    PostSnapshot { snapshot_path: String },
    Abort,
    Complete { outcome: String },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Prepare => "prepare",
            Op::Freeze => "freeze",
            Op::Thaw => "thaw",
            Op::PostSnapshot { .. } => "post-snapshot",
            Op::Abort => "abort",
            Op::Complete { .. } => "complete",
        }
    }

    /// Calls that release a writer; they are queued even behind a hung call.
    fn releases(&self) -> bool {
        matches!(self, Op::Thaw | Op::Abort | Op::Complete { .. })
    }
}

/// How a writer's own code answered a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    Failed(String),
    Panicked(String),
}

/// Something that can carry out writer calls synchronously: a plugin's writer object, or (later)
/// an application's writer reached over D-Bus.
pub trait Backend: Send + 'static {
    fn call(&mut self, op: &Op, set_id: &str, budget: Duration) -> Result<Reports, BackendError>;
}

/// A plugin writer behind the stable ABI.
pub struct PluginBackend(pub WriterBox);

impl Backend for PluginBackend {
    fn call(&mut self, op: &Op, set_id: &str, budget: Duration) -> Result<Reports, BackendError> {
        let mut ctx = CallContext {
            set_id: RString::from(set_id),
            budget_ms: budget.as_millis().try_into().unwrap_or(u64::MAX),
            snapshot_path: ROption::RNone,
            outcome: ROption::RNone,
        };
        let w = &mut self.0;
        let result = match op {
            Op::Prepare => w.prepare(&ctx),
            Op::Freeze => w.freeze(&ctx),
            Op::Thaw => w.thaw(&ctx),
            Op::PostSnapshot { snapshot_path } => {
                ctx.snapshot_path = ROption::RSome(RString::from(snapshot_path.as_str()));
                w.post_snapshot(&ctx)
            }
            Op::Abort => w.abort(&ctx),
            Op::Complete { outcome } => {
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
                let message = e.message.into_string();
                Err(match e.kind {
                    ErrorKind::Panicked => BackendError::Panicked(message),
                    ErrorKind::Failed | ErrorKind::InvalidConfig => BackendError::Failed(message),
                })
            }
        }
    }
}

/// Why a call did not succeed. Every message names the writer and the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("writer {writer}: {op} failed: {message}")]
    Failed {
        writer: String,
        op: &'static str,
        message: String,
    },
    #[error("writer {writer}: panicked in {op}: {message}")]
    Panicked {
        writer: String,
        op: &'static str,
        message: String,
    },
    #[error("writer {writer}: no answer to {op} within {budget_ms} ms; the call was abandoned and the writer is aborted as soon as it returns")]
    Timeout {
        writer: String,
        op: &'static str,
        budget_ms: u64,
    },
    #[error("writer {writer}: still stuck in {op} from an earlier call ({stuck_ms} ms); it is not called again until that returns — restart the host to reload its plugin")]
    Stuck {
        writer: String,
        op: &'static str,
        stuck_ms: u64,
    },
    #[error("writer {writer}: its worker thread has stopped")]
    Gone { writer: String },
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

    fn after(op: &Op, ok: bool, before: State) -> State {
        if !ok {
            return State::Failed;
        }
        match op {
            Op::Prepare => State::Prepared,
            Op::Freeze => State::Frozen,
            Op::Thaw => State::Thawed,
            Op::PostSnapshot { .. } => before,
            Op::Abort | Op::Complete { .. } => State::Idle,
        }
    }
}

/// The call a worker is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub op: &'static str,
    pub since: Instant,
    /// When its caller stops waiting: past it, the writer is stuck.
    pub deadline: Instant,
}

/// What the worker is doing, published for callers and observers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// The call running now, and since when.
    pub busy: Option<Busy>,
    /// Calls waiting behind it.
    pub queued: usize,
    /// Since when the writer has been frozen (its freeze began), if it is.
    pub frozen_since: Option<Instant>,
    /// How often the watchdog thawed this writer on its own.
    pub watchdog_thaws: u64,
    /// The last call's failure, if the last call failed.
    pub last_error: Option<String>,
}

struct Job {
    op: Op,
    set_id: String,
    budget: Duration,
    reply: oneshot::Sender<Result<Reports, BackendError>>,
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
            frozen_by: String::new(),
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
    pub fn stuck(&self, now: Instant) -> Option<(&'static str, Duration)> {
        let s = self.status.borrow();
        s.busy
            .filter(|b| now > b.deadline)
            .map(|b| (b.op, now.saturating_duration_since(b.since)))
    }

    /// Waits until the worker has nothing running or queued (for shutdown and tests).
    pub async fn settled(&self) {
        let mut rx = self.status.subscribe();
        let _ = rx.wait_for(|s| s.busy.is_none() && s.queued == 0).await;
    }

    /// Calls the writer and waits at most `budget` for its answer.
    pub async fn call(&self, op: Op, set_id: &str, budget: Duration) -> Result<Reports, CallError> {
        self.start_call(op, set_id, budget).answer().await
    }

    /// Queues a call at once, in the order of the calls made, and returns its pending answer.
    ///
    /// Queuing is synchronous so that calls reach the writer in exactly the order the driver
    /// made them, even when their answers are awaited on different tasks: a set's closing
    /// `complete` can never overtake the next set's `prepare`.
    ///
    /// Releasing calls (thaw, abort, complete) are always queued, even behind a call that hangs,
    /// so a writer that eventually returns from a hung freeze is still released. Other calls to a
    /// writer that is still busy with an abandoned call are refused at once.
    pub fn start_call(&self, op: Op, set_id: &str, budget: Duration) -> PendingCall {
        let writer = self.metadata.id.clone();
        let name = op.name();
        let pending = |answer| PendingCall {
            writer: writer.clone(),
            op: name,
            budget,
            answer,
        };
        if !op.releases() {
            if let Some((stuck_op, stuck)) = self.stuck(Instant::now()) {
                return pending(Err(CallError::Stuck {
                    writer: writer.clone(),
                    op: stuck_op,
                    stuck_ms: stuck.as_millis() as u64,
                }));
            }
        }
        let (reply, answer) = oneshot::channel();
        self.status.send_modify(|s| s.queued += 1);
        let job = Job {
            op,
            set_id: set_id.to_string(),
            budget,
            reply,
        };
        if self.jobs.send(job).is_err() {
            return pending(Err(CallError::Gone {
                writer: writer.clone(),
            }));
        }
        pending(Ok(answer))
    }
}

/// A call queued to a writer, whose answer is still to come.
#[derive(Debug)]
pub struct PendingCall {
    writer: String,
    op: &'static str,
    budget: Duration,
    answer: Result<oneshot::Receiver<Result<Reports, BackendError>>, CallError>,
}

impl PendingCall {
    /// Waits at most the call's budget for the writer's answer.
    pub async fn answer(self) -> Result<Reports, CallError> {
        let PendingCall {
            writer,
            op,
            budget,
            answer,
        } = self;
        let answer = answer?;
        match tokio::time::timeout(budget, answer).await {
            Ok(Ok(Ok(reports))) => Ok(reports),
            Ok(Ok(Err(BackendError::Failed(message)))) => Err(CallError::Failed {
                writer,
                op,
                message,
            }),
            Ok(Ok(Err(BackendError::Panicked(message)))) => Err(CallError::Panicked {
                writer,
                op,
                message,
            }),
            Ok(Err(_)) => Err(CallError::Gone { writer }),
            Err(_) => {
                tracing::error!(writer = %writer, op, budget_ms = budget.as_millis() as u64,
                    "writer did not answer within its deadline; the call is abandoned");
                Err(CallError::Timeout {
                    writer,
                    op,
                    budget_ms: budget.as_millis() as u64,
                })
            }
        }
    }
}

struct Worker {
    writer: String,
    backend: Box<dyn Backend>,
    jobs: mpsc::Receiver<Job>,
    status: Arc<watch::Sender<Status>>,
    hold_limit: Duration,
    /// The set whose freeze holds the writer, for the watchdog's thaw.
    frozen_by: String,
}

impl Worker {
    fn run(mut self) {
        loop {
            let frozen_since = self.status.borrow().frozen_since;
            let job = match frozen_since {
                Some(since) => {
                    let left = (since + self.hold_limit).saturating_duration_since(Instant::now());
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

    fn run_job(&mut self, job: Job) {
        let started = Instant::now();
        let name = job.op.name();
        self.status.send_modify(|s| {
            s.queued = s.queued.saturating_sub(1);
            s.busy = Some(Busy {
                op: name,
                since: started,
                deadline: started + job.budget,
            });
        });
        let result = self.call(&job.op, &job.set_id, job.budget);
        self.status.send_modify(|s| {
            s.busy = None;
            s.state = State::after(&job.op, result.is_ok(), s.state);
            s.last_error = match &result {
                Ok(_) => None,
                Err(BackendError::Failed(m)) | Err(BackendError::Panicked(m)) => Some(m.clone()),
            };
            match job.op {
                // Even a failed freeze may have half-frozen the writer: the watchdog covers it.
                Op::Freeze => s.frozen_since = Some(started),
                Op::Thaw | Op::Abort => s.frozen_since = None,
                _ => {}
            }
        });
        if job.op == Op::Freeze {
            self.frozen_by = job.set_id.clone();
        }
        // The caller may have given up (deadline passed): then nobody listens, which is fine.
        let _ = job.reply.send(result);
    }

    /// Calls the backend; a panic (a bug in a backend that is not an SDK plugin, whose panics the
    /// SDK already catches) becomes an error instead of ending this thread.
    fn call(&mut self, op: &Op, set_id: &str, budget: Duration) -> Result<Reports, BackendError> {
        let backend = &mut self.backend;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            backend.call(op, set_id, budget)
        }))
        .unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(BackendError::Panicked(message))
        })
    }

    fn watchdog_thaw(&mut self) {
        tracing::warn!(writer = %self.writer, set = %self.frozen_by,
            hold_limit_ms = self.hold_limit.as_millis() as u64,
            "hold limit reached: the host thaws the writer on its own");
        let started = Instant::now();
        self.status.send_modify(|s| {
            s.busy = Some(Busy {
                op: "thaw (watchdog)",
                since: started,
                deadline: started + self.hold_limit,
            })
        });
        let set_id = self.frozen_by.clone();
        let result = self.call(&Op::Thaw, &set_id, self.hold_limit);
        if let Err(e) = &result {
            tracing::error!(writer = %self.writer, error = ?e, "watchdog thaw failed");
        }
        self.status.send_modify(|s| {
            s.busy = None;
            s.frozen_since = None;
            s.state = State::after(&Op::Thaw, result.is_ok(), s.state);
            s.watchdog_thaws += 1;
        });
    }
}
