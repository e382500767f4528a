//! The broker's integration tests: one binary (house style). Real processes on loopback: the
//! `quiesce-broker` daemon, `quiesce-host` daemons (each with its own private dbus-daemon and
//! the hello-writer plugin), the `quiesce` CLI and the example app writer; certificates from
//! `quiesce-broker certs`. Every wait is on a condition, under a deadline.

mod cephfs;
mod cluster;
mod daemon;
mod security;
mod sets;
mod support;
