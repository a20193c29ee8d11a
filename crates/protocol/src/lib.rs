//! `tokenfleet-protocol`: the wire contract between the coordinator and vehicle agents.
//!
//! Package `tokenfleet.v1` (protobuf, gRPC via tonic): one bidirectional stream per agent,
//! opened by the agent (vehicles sit behind carrier NAT). Each direction is a single message
//! family: [`v1::AgentMessage`] (agent → coordinator) and [`v1::CoordinatorMessage`]
//! (coordinator → agent). This crate holds the generated types, the service stubs and small
//! conveniences; no I/O policy lives here.
//!
//! Layout:
//! - `proto/tokenfleet/v1/node.proto`: the contract, with comments on every field.
//! - [`v1`]: the generated code (`prost` messages, `tonic` client and server).
//! - [`PROTOCOL_VERSION`]: sent in `Hello`; the coordinator refuses agents it cannot serve.

/// Generated from `proto/tokenfleet/v1/node.proto`.
pub mod v1 {
    tonic::include_proto!("tokenfleet.v1");
}

/// The protocol version this build speaks (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

pub use v1::agent_message::Msg as AgentMsg;
pub use v1::coordinator_message::Msg as CoordinatorMsg;

impl v1::AgentMessage {
    pub fn new(msg: AgentMsg) -> Self {
        Self { msg: Some(msg) }
    }
}

impl v1::CoordinatorMessage {
    pub fn new(msg: CoordinatorMsg) -> Self {
        Self { msg: Some(msg) }
    }
}
