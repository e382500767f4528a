//! The host's integration tests: one binary (house style), real plugins, a real dbus-daemon,
//! the real `quiesce-host` and `app-writer` processes.

mod daemon;
mod dbus;
mod hostile;
mod plugins;
mod support;
