//! The fleet: the manager ([`manager`], the single task that owns every job, the queue and the
//! fleet view: dispatch, leases, node events, continuation, verdicts), what it keeps per
//! vehicle ([`nodes`]), its ordered store writer ([`writer`]) and the optional decision log of
//! every scheduler round ([`decision_log`]). In a cluster of coordinators: this one's share of
//! the jobs ([`ownership`]: lease renewal, the orphan sweep) and jobs followed for a client
//! here while another coordinator runs them ([`follow`]). Nodes reach it through a transport-agnostic link
//! (a bounded channel of `tokenfleet.v1` messages); refusals are [`manager::NodeRefusal`], not
//! gRPC statuses.
//!
//! May import: `clock`, `config`, `metrics`, `domain`, `policy` (regions), `trust` (the
//! verifier's queue and reports, reputations). Not `openai`, `batch`, `http`, `transport`.

pub mod decision_log;
pub(crate) mod follow;
pub(crate) mod manager;
pub(crate) mod nodes;
pub(crate) mod ownership;
pub(crate) mod queue;
pub(crate) mod writer;
