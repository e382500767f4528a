//! `org.quiesce.Writer1`: one object per writer, its metadata as properties, its `State`
//! followed with `PropertiesChanged`, and diagnostic `Freeze`/`Thaw`.

use super::authorize;
use crate::host::Host;
use crate::worker::{Holder, WriterHandle};
use quiesce_dbus::{writer_path, Error};
use quiesce_proto::WriterCall;
use std::sync::Arc;
use std::time::Duration;
use zbus::message::Header;
use zbus::Connection;

/// Emits `PropertiesChanged` for `State` whenever the writer's state changes.
pub(super) async fn watch_state(
    connection: &Connection,
    handle: Arc<WriterHandle>,
) -> zbus::Result<()> {
    let path = writer_path(handle.id());
    let iface = connection
        .object_server()
        .interface::<_, WriterIface>(path)
        .await?;
    let mut status = handle.subscribe();
    tokio::spawn(async move {
        let mut last = status.borrow().state;
        while status.changed().await.is_ok() {
            let state = status.borrow().state;
            if state != last {
                last = state;
                let emitter = iface.signal_emitter();
                if iface.get().await.state_changed(emitter).await.is_err() {
                    break; // the object is gone
                }
            }
        }
    });
    Ok(())
}

pub(super) struct WriterIface {
    handle: Arc<WriterHandle>,
    freeze_budget: Duration,
    thaw_budget: Duration,
}

impl WriterIface {
    pub(super) fn new(handle: Arc<WriterHandle>, host: &Host) -> Self {
        let deadlines = host.config().deadlines();
        WriterIface {
            handle,
            freeze_budget: deadlines.freeze,
            thaw_budget: deadlines.thaw,
        }
    }
}

impl WriterIface {
    /// A diagnostic call never touches a writer a set holds: it would thaw it before its
    /// snapshot, or keep it frozen past the set.
    fn refuse_if_a_set_holds(&self, what: &str) -> Result<(), Error> {
        match self.handle.status().held_by {
            Some(Holder::Set(set)) => Err(Error::Busy(format!(
                "writer {} is held frozen by set {set}: a diagnostic {what} must wait until the set releases it",
                self.handle.id()
            ))),
            _ => Ok(()),
        }
    }

    /// A set took the writer between the check and the call: still `Busy`.
    fn call_failed(&self, e: quiesce_proto::CallFailure) -> Error {
        match self.handle.status().held_by {
            Some(Holder::Set(_)) => Error::Busy(e.to_string()),
            _ => Error::CallFailed(e.to_string()),
        }
    }
}

#[zbus::interface(name = "org.quiesce.Writer1")]
impl WriterIface {
    /// Freezes the writer outside any set, for diagnosis. The hold limit still thaws it.
    async fn freeze(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        authorize(connection, &header, "freeze a writer").await?;
        self.refuse_if_a_set_holds("freeze")?;
        self.handle
            .diagnose(WriterCall::Freeze, self.freeze_budget)
            .await
            .map(drop)
            .map_err(|e| self.call_failed(e))
    }

    async fn thaw(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        authorize(connection, &header, "thaw a writer").await?;
        self.refuse_if_a_set_holds("thaw")?;
        self.handle
            .diagnose(WriterCall::Thaw, self.thaw_budget)
            .await
            .map(drop)
            .map_err(|e| self.call_failed(e))
    }

    #[zbus(property)]
    async fn id(&self) -> String {
        self.handle.id().to_string()
    }

    #[zbus(property)]
    async fn name(&self) -> String {
        self.handle.metadata.name.clone()
    }

    #[zbus(property)]
    async fn level(&self) -> String {
        self.handle.metadata.level.as_str().to_string()
    }

    #[zbus(property)]
    async fn instance(&self) -> String {
        self.handle.metadata.instance.clone()
    }

    #[zbus(property)]
    async fn vendor_version(&self) -> String {
        self.handle.metadata.vendor_version.clone()
    }

    /// (name, kind, volume, paths) of each component.
    #[zbus(property)]
    async fn components(&self) -> Vec<(String, String, String, Vec<String>)> {
        self.handle
            .metadata
            .components
            .iter()
            .map(|c| {
                let kind = c.kind.to_string();
                (c.name.clone(), kind, c.volume.clone(), c.paths.clone())
            })
            .collect()
    }

    #[zbus(property)]
    async fn expected_freeze_ms(&self) -> u64 {
        self.handle.metadata.expected_freeze_ms
    }

    #[zbus(property)]
    async fn needs_post_snapshot(&self) -> bool {
        self.handle.metadata.needs_post_snapshot
    }

    /// Where the writer comes from: `plugin NAME (PATH)` or `application BUS-NAME at OBJECT`.
    #[zbus(property)]
    async fn origin(&self) -> String {
        self.handle.origin.clone()
    }

    /// `idle`, `prepared`, `frozen`, `thawed` or `failed`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.handle.status().state.as_str().to_string()
    }

    /// The full metadata as JSON.
    #[zbus(property)]
    async fn metadata(&self) -> String {
        serde_json::to_string(&self.handle.metadata).unwrap_or_default()
    }
}
