//! Integration tests live in `it.rs` and its modules (one test binary).
