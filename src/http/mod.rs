//! The registry HTTP API: routing of request lines, handlers, the OCI error mapping and the
//! response body type.

pub mod auth;
pub mod body;
pub mod error;
pub mod handlers;
pub mod routes;
