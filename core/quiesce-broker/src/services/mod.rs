//! The broker's gRPC services, one module each, over the shared [`crate::broker::Broker`].

mod catalog;
mod health;
mod link;
mod sets;

pub use catalog::CatalogService;
pub use health::HealthService;
pub use link::{check_registration, LinkService};
pub use sets::SetsService;
