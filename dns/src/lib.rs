//! Agent DNS: answers `<alias>.<network>.gstacks` from a live record table
//! and forwards every other name to the host's resolvers.
//!
//! This crate owns no policy: it only says where an alias's local proxy
//! listener is.
