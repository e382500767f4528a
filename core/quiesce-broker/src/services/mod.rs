//! The broker's gRPC services, one module each, over the shared [`crate::broker::Broker`].

mod catalog;
mod link;
mod sets;

pub use catalog::CatalogService;
pub use link::{check_registration, LinkService};
pub use sets::SetsService;
