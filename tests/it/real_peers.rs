//! Real-peer tests: being written.
