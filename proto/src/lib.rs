//! The GlobalStacks contract: protobuf messages and gRPC services of package
//! `globalstacks.v1`, generated at build time from `proto/globalstacks/v1`.
//!
//! Versioning rule: fields and messages are only added, never renumbered,
//! retyped or reused (see `common.proto`). This crate holds no logic beyond
//! the generated code, the build identity shared by our binaries, and the
//! argument-error convention those binaries share.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("globalstacks.v1");
}

pub mod build_info;

pub use v1::*;
