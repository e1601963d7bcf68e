//! Shared helpers for the cross-tool integration tests.
