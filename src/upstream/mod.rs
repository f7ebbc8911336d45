//! Upstream registries: the HTTP client and API calls, and the closed routing table.

pub mod auth;
pub mod client;
pub mod egress;
pub mod routing;

pub use client::{Error, Upstream};
pub use routing::{RouteError, Target, Upstreams};
