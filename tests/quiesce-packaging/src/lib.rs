//! The packaging test's crate: nothing but `tests/packages.rs`, which builds the Debian
//! packages (`scripts/package`), installs them into a throwaway root with `dpkg --root`, checks
//! what landed where, and removes and purges them again.
