//! The `agent_proxy` data path: per-alias listeners on the source agent, the
//! policy check at both ends, the dial over the mesh with a small header, and
//! the splice into the target sandbox.
//!
//! This crate parses no config and reads no environment: the agent hands it
//! addresses and tables.
