//! The broker's sets on this node: its `SetCommand`s carried out on the writers, and the node's
//! leases kept.
//!
//! A command becomes one call on the writer's worker thread (queued in arrival order, like a
//! local set's calls), and its answer one `CommandReply` on whichever link is open when it comes.
//!
//! **Leases** are what keeps a node safe from a broker that vanishes. For every set the broker
//! grants the node a lease and renews it every third of its length. The [`Leases`] keeper lives
//! outside any one link: when the link breaks or the broker dies, nobody renews, and when the
//! lease lapses the node aborts, on its own, every writer the set called and did not release
//! (sent `Abort` or `Complete`). The hold-limit watchdog in each worker remains the last line:
//! it thaws a frozen writer even if this task is stuck.
//!
//! A lapsed lease is **remembered**: the node tells the broker (`LeaseLapsed` on whichever
//! link is open), answers every later command of that set — a late thaw above all — with a
//! `lost` failure, and never lets a late renewal re-create the lease. So a set whose writers
//! this node let go can never be recorded app-consistent on this node's word.

use crate::Host;
use quiesce_link::calls::{call_from_wire, failure_to_wire};
use quiesce_link::v1::{self, command_reply, host_message};
use quiesce_proto::{CallFailure, WriterCall};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Where the answers to commands go: the open link's outgoing messages.
pub type Replies = mpsc::UnboundedSender<host_message::Body>;

struct Lease {
    until: Instant,
    /// Writers the set called and has not released yet.
    open: BTreeSet<String>,
}

/// How many lapsed sets a node remembers (each answers its late commands with `lost`).
const LAPSED_REMEMBERED: usize = 1024;

/// The node's leases on the broker's sets, and the task that acts when one lapses.
pub struct Leases {
    host: Arc<Host>,
    leases: Mutex<HashMap<String, Lease>>,
    changed: Notify,
    /// Sets whose lease lapsed here, newest last, with why.
    lapsed: Mutex<VecDeque<(String, String)>>,
    /// Lapses the broker has not been told of yet; the open link sends them.
    notices: Mutex<Vec<v1::LeaseLapsed>>,
    noticed: Notify,
}

impl Leases {
    /// Starts the keeper; it runs until the process ends.
    pub fn start(host: Arc<Host>) -> Arc<Leases> {
        let leases = Arc::new(Leases {
            host,
            leases: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            lapsed: Mutex::new(VecDeque::new()),
            notices: Mutex::new(Vec::new()),
            noticed: Notify::new(),
        });
        tokio::spawn(leases.clone().keep());
        leases
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the lease on `set` lapsed here, if it did.
    pub fn lapsed(&self, set: &str) -> Option<String> {
        let lapsed = self.lapsed.lock().unwrap_or_else(|e| e.into_inner());
        lapsed
            .iter()
            .rev()
            .find(|(id, _)| id == set)
            .map(|(_, why)| why.clone())
    }

    /// Lapses to tell the broker of, oldest first; empty when there are none.
    pub fn take_notices(&self) -> Vec<v1::LeaseLapsed> {
        std::mem::take(&mut *self.notices.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Completes when there may be lapses to tell the broker of.
    pub async fn noticed(&self) {
        self.noticed.notified().await
    }

    fn notice(&self, set: &str, reason: &str) {
        self.notices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(v1::LeaseLapsed {
                set_id: set.into(),
                reason: reason.into(),
            });
        self.noticed.notify_one();
    }

    /// The broker granted or renewed the lease on `set` for `lease` from now. A lease that
    /// lapsed here is not re-created: the broker is told again instead.
    pub fn renew(&self, set: &str, lease: Duration) {
        if let Some(why) = self.lapsed(set) {
            tracing::warn!(set, "a renewal came for a set whose lease lapsed here: not renewed; telling the broker again");
            self.notice(set, &why);
            return;
        }
        let until = Instant::now() + lease;
        self.lock()
            .entry(set.to_string())
            .and_modify(|l| l.until = until)
            .or_insert_with(|| Lease {
                until,
                open: BTreeSet::new(),
            });
        self.changed.notify_one();
    }

    /// The set is over for this node.
    pub fn end(&self, set: &str) {
        if let Some(lease) = self.lock().remove(set) {
            if !lease.open.is_empty() {
                tracing::warn!(set, writers = ?lease.open, "the broker ended its lease with writers not released");
            }
        }
        self.changed.notify_one();
    }

    /// The number of sets this node holds a lease on now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Notes that `writer` was called (`releases`: and released) in `set`.
    fn called(&self, set: &str, writer: &str, releases: bool, budget: Duration) {
        let mut leases = self.lock();
        let mut new_lease = false;
        let lease = leases.entry(set.to_string()).or_insert_with(|| {
            // A command without a lease (the broker must grant one first): guard it anyway,
            // for no longer than the call may take.
            tracing::warn!(
                set,
                "a set command arrived without a lease; guarding it for its budget"
            );
            new_lease = true;
            Lease {
                until: Instant::now() + budget,
                open: BTreeSet::new(),
            }
        });
        if releases {
            lease.open.remove(writer);
        } else {
            lease.open.insert(writer.to_string());
            // A writer serves one set at a time: a call of this set supersedes another set's
            // claim on it (a set of a broker that died and was restarted: the new broker knows
            // nothing of it). That set's lease lapsing later must not abort the writer in the
            // middle of this one: its abort would drop what this set prepared, or thaw what
            // this set froze before the snapshot. This set's lease, its end and the hold-limit
            // watchdog release the writer now.
            for (id, other) in leases.iter_mut() {
                if id != set {
                    other.open.remove(writer);
                }
            }
        }
        drop(leases);
        // The keeper only cares when leases lapse, which a call changes only by making a lease.
        if new_lease {
            self.changed.notify_one();
        }
    }

    async fn keep(self: Arc<Self>) {
        loop {
            let next = self.lock().values().map(|l| l.until).min();
            let notified = self.changed.notified();
            match next {
                Some(until) if until <= Instant::now() => self.lapse(),
                Some(until) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => self.lapse(),
                        () = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Aborts the open writers of every lease that lapsed.
    fn lapse(&self) {
        let now = Instant::now();
        let lapsed: Vec<(String, Lease)> = {
            let mut leases = self.lock();
            let ids: Vec<String> = leases
                .iter()
                .filter(|(_, l)| l.until <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.remove(&id).map(|l| (id, l)))
                .collect()
        };
        let budget = self.host.config().deadlines().abort;
        for (set, lease) in lapsed {
            crate::metrics::lease_lapsed();
            tracing::error!(
                set,
                writers = ?lease.open,
                "the lease on this set lapsed (no renewal from the broker: it died, paused, or the link is cut); aborting its writers on our own"
            );
            let why = format!(
                "node {}: its lease on set {set} lapsed (no renewal in time: the broker died, paused, or the link was cut); it released the set's writers on its own",
                self.host.node()
            );
            {
                let mut remembered = self.lapsed.lock().unwrap_or_else(|e| e.into_inner());
                remembered.push_back((set.clone(), why.clone()));
                while remembered.len() > LAPSED_REMEMBERED {
                    remembered.pop_front();
                }
            }
            self.notice(&set, &why);
            for id in lease.open {
                let Some(writer) = self.host.writer(&id) else {
                    continue;
                };
                let pending = writer.start_call(WriterCall::Abort, &set, budget);
                let set = set.clone();
                tokio::spawn(async move {
                    match pending.answer().await {
                        Ok(_) => {
                            tracing::info!(set, writer = %id, "aborted after the lease lapsed")
                        }
                        Err(e) => tracing::error!(set, "abort after the lease lapsed: {e}"),
                    }
                });
            }
        }
    }
}

/// Carries out one `SetCommand`; its answer goes to `replies`.
pub fn carry_out(host: &Host, leases: &Leases, command: v1::SetCommand, replies: &Replies) {
    let v1::SetCommand {
        command_id,
        set_id,
        writer,
        budget_ms,
        call,
        ..
    } = command;
    let reply = |result| {
        let _ = replies.send(host_message::Body::CommandReply(v1::CommandReply {
            command_id,
            set_id: set_id.clone(),
            writer: writer.clone(),
            result: Some(result),
        }));
    };
    let failed = |failure: CallFailure| command_reply::Result::Failed(failure_to_wire(&failure));
    let call = match call.map(call_from_wire) {
        Some(Ok(call)) => call,
        Some(Err(e)) => return reply(failed(CallFailure::error(format!("node {}: {e}", host.node())))),
        None => {
            return reply(failed(CallFailure::error(format!(
                "node {}: the broker sent a command this host does not know (a newer broker?); upgrade the host",
                host.node()
            ))))
        }
    };
    if let Some(why) = leases.lapsed(&set_id) {
        if matches!(call, WriterCall::Complete { .. }) {
            return;
        }
        // Never a thaw that says "held" after this node let its writers go.
        return reply(failed(CallFailure::lost(why)));
    }
    let budget = Duration::from_millis(budget_ms.into());
    let Some(handle) = host.writer(&writer) else {
        return reply(failed(CallFailure::lost(format!(
            "node {} has no writer {writer:?} (any more)",
            host.node()
        ))));
    };
    // Thaw is not a release here: a set may still abort a thawed writer (post-snapshot work).
    let releases = matches!(call, WriterCall::Abort | WriterCall::Complete { .. });
    leases.called(&set_id, &writer, releases, budget);
    let pending = handle.start_call(call, &set_id, budget);
    let replies = replies.clone();
    tokio::spawn(async move {
        let result = match pending.answer().await {
            Ok(reports) => command_reply::Result::Ok(v1::CallOk {
                reports: reports.into_iter().collect(),
            }),
            Err(failure) => command_reply::Result::Failed(failure_to_wire(&failure)),
        };
        let _ = replies.send(host_message::Body::CommandReply(v1::CommandReply {
            command_id,
            set_id,
            writer,
            result: Some(result),
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::Backend;
    use crate::Config;
    use quiesce_link::v1::set_command;
    use quiesce_proto::{Level, Reports, WriterMetadata};
    use std::path::Path;

    /// Sends every call it gets as `<op> <set>`.
    struct Recorder(mpsc::UnboundedSender<String>);

    impl Backend for Recorder {
        fn call(
            &mut self,
            call: &WriterCall,
            set: &str,
            _: Duration,
        ) -> Result<Reports, CallFailure> {
            let _ = self.0.send(format!("{} {set}", call.kind()));
            Ok(Reports::new())
        }
    }

    fn command(set: &str, call: set_command::Call) -> v1::SetCommand {
        v1::SetCommand {
            command_id: 1,
            set_id: set.into(),
            epoch: 1,
            writer: "w".into(),
            budget_ms: 1000,
            call: Some(call),
        }
    }

    /// A broker killed mid-set and restarted at once starts a new set on the same writers while
    /// the old set's lease still runs. The old lease lapsing must not abort the writer in the
    /// middle of the new set (seen in quiesce-lab: the postgres writer's prepared session dropped
    /// by the stale abort, the new set failing at freeze; a writer frozen by the new set would
    /// have been thawed before its snapshot).
    #[tokio::test]
    async fn a_lapsing_lease_of_an_abandoned_set_leaves_a_writer_a_newer_set_called_alone() {
        let config = Config::parse("node = \"n1\"\n", Path::new("host.toml")).unwrap();
        let host = Arc::new(Host::start(config));
        let (record, mut calls) = mpsc::unbounded_channel();
        let metadata = WriterMetadata::new("w", "recording writer", Level::BackEnd);
        host.add_writer(metadata, "test".into(), Box::new(Recorder(record)))
            .unwrap();
        let leases = Leases::start(host.clone());
        let (replies, mut answers) = mpsc::unbounded_channel();
        let prepare = || set_command::Call::Prepare(v1::Prepare {});

        // The abandoned set: prepared, then its broker is gone; its lease lapses first.
        leases.renew("old", Duration::from_millis(200));
        carry_out(&host, &leases, command("old", prepare()), &replies);
        answers.recv().await.unwrap();
        // The restarted broker's set calls the same writer; its lease lapses later.
        leases.renew("new", Duration::from_millis(600));
        let freeze = set_command::Call::Freeze(v1::Freeze {
            hold_limit_ms: 1000,
        });
        for call in [prepare(), freeze] {
            carry_out(&host, &leases, command("new", call), &replies);
            answers.recv().await.unwrap();
        }
        // The new set's own lease lapses: the writer is aborted for it. The old lease lapsed
        // before that and must have aborted nothing.
        let mut seen = vec![];
        let until_abort = async {
            while let Some(call) = calls.recv().await {
                seen.push(call);
                if seen.last().is_some_and(|c| c == "abort new") {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), until_abort)
            .await
            .unwrap_or_else(|_| panic!("no abort after the new lease lapsed: {seen:?}"));
        assert_eq!(
            seen,
            ["prepare old", "prepare new", "freeze new", "abort new"],
            "the abandoned set's lapsing lease aborted the writer the new set holds"
        );
        assert_eq!(leases.count(), 0);
        // Both lapses counted (the only test of this process that lets leases lapse).
        assert_eq!(crate::metrics::lease_lapses(), 2);
    }
}
