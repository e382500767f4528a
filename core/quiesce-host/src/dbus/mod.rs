//! The host on D-Bus: `org.quiesce.Host1`, one `org.quiesce.Writer1` object per writer, and
//! application writers registered at run time (`org.quiesce.AppWriter1`).
//!
//! Authorisation is checked twice: the system bus policy (`dbus/org.quiesce.Host1.conf`) lets only
//! root and the `quiesce` group call the methods that freeze, thaw, register or start a set; and
//! the host itself asks the bus for the caller's uid and refuses everyone else, because a bus
//! may run a permissive policy. Reading metadata is open to all.
//!
//! `CreateSnapshot`, `ListSnapshots`, `ShowSnapshot` and `DeleteSnapshot` forward to the broker
//! ([`crate::set_requests`]) and may wait for a whole cluster set. They must not hold up other
//! calls, and do not: zbus runs each method call of an interface in a task of its own
//! (`spawn_tasks_for_methods`, on by default) under a *read* lock of the interface object, so
//! calls wait for one another only if a method takes `&mut self` (a write lock). Keep every
//! method of `HostIface` and `WriterIface` on `&self`, and hold no `std` mutex across an await.

mod app_writers;
mod host1;
mod writer1;

use crate::host::Host;
use crate::set_requests::SetRequests;
use host1::HostIface;
use quiesce_dbus::{writer_path, Error, HOST_NAME, HOST_PATH};
use std::sync::Arc;
use writer1::WriterIface;
use zbus::message::Header;
use zbus::{fdo, Connection};

/// The Unix group whose members may drive the host (besides root).
pub const OPERATOR_GROUP: &str = "quiesce";

/// Serves the host on the bus at `address` (the system bus when `None`) and takes the name
/// `org.quiesce.Host1` last, once every object is in place. `set_requests` forwards the
/// cluster snapshot methods to the broker the host was started with (if any).
pub async fn serve(
    host: Arc<Host>,
    address: Option<&str>,
    set_requests: SetRequests,
) -> zbus::Result<Served> {
    let builder = match address {
        Some(address) => zbus::connection::Builder::address(address)?,
        None => zbus::connection::Builder::system()?,
    };
    let apps = app_writers::AppWriters::new(host.config().app_calls_in_flight);
    let mut builder = builder.serve_at(HOST_PATH, fdo::ObjectManager)?.serve_at(
        HOST_PATH,
        HostIface::new(host.clone(), apps.clone(), set_requests),
    )?;
    let writers = host.writers();
    for w in &writers {
        builder = builder.serve_at(writer_path(w.id()), WriterIface::new(w.clone(), &host))?;
    }
    let connection = builder.build().await?;
    for w in &writers {
        writer1::watch_state(&connection, w.clone()).await?;
    }
    app_writers::watch_vanishing(&connection, host, apps).await?;
    let closed = closed(&connection).await?;
    // The name last: whoever sees it may rely on everything above (and a bus lost from then
    // on is seen by `closed`, not as a failure to start).
    connection.request_name(HOST_NAME).await?;
    Ok(Served {
        connection,
        closed: Box::pin(closed),
    })
}

/// The host on the bus: its connection, and a future that completes when the bus closes it.
pub struct Served {
    pub connection: Connection,
    pub closed: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// Refuses callers that are neither root nor in the operator group.
async fn authorize(
    connection: &Connection,
    header: &Header<'_>,
    action: &str,
) -> Result<u32, Error> {
    let sender = header
        .sender()
        .ok_or_else(|| Error::NotAuthorized("the call has no sender".into()))?;
    let uid = fdo::DBusProxy::new(connection)
        .await?
        .get_connection_unix_user(sender.clone().into())
        .await?;
    if uid == 0 || in_operator_group(uid) {
        return Ok(uid);
    }
    Err(Error::NotAuthorized(format!(
        "uid {uid} may not {action}: only root and members of the {OPERATOR_GROUP:?} group may freeze, thaw, register writers, start sets or delete snapshots; reading metadata and records is open to everyone"
    )))
}

fn in_operator_group(uid: u32) -> bool {
    use nix::unistd::{Group, Uid, User};
    let (Ok(Some(user)), Ok(Some(group))) = (
        User::from_uid(Uid::from_raw(uid)),
        Group::from_name(OPERATOR_GROUP),
    ) else {
        return false;
    };
    user.gid == group.gid || group.mem.iter().any(|m| m == &user.name)
}

/// Completes when the bus closes this connection (the daemon stopped, or it disconnected the
/// host): a stream of a signal nobody sends ends exactly then.
async fn closed(connection: &Connection) -> zbus::Result<impl std::future::Future<Output = ()>> {
    use futures_util::StreamExt;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.quiesce.Host1.Unused")?
        .build();
    let mut stream = zbus::MessageStream::for_match_rule(rule, connection, Some(1)).await?;
    Ok(async move { while stream.next().await.is_some() {} })
}
