//! `tokenfleet`, the single binary: the command line and the benchmarks.
//!
//! Layout:
//! - [`cli`]: argument parsing (clap) and dispatch to the subcommands.
//! - [`serve`]: `tokenfleet coordinator`, `agent`; [`up`]: `tokenfleet up` (secured demo fleet).
//! - [`fleet_cmd`]: `tokenfleet fleet token|revoke` and `tokenfleet enroll`.
//! - [`swtpm`]: a software TPM per vehicle for fleets on one machine and tests.
//! - [`sim_cmd`]: `tokenfleet sim`, the fleet simulator's command line.
//! - [`tls`]: a self-signed certificate for fleets on one machine.
//! - [`chat`]: `tokenfleet chat`, one prompt through the local engine, streamed.
//! - [`verify_cmd`]: `tokenfleet verify calibrate`, the verifier's thresholds from honest work.
//! - [`bench`]: `tokenfleet bench ...`, our figures next to a reference measured in the same run.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod fleet_cmd;
pub mod procfs;
pub mod replay_cmd;
pub mod serve;
pub mod sim_cmd;
pub mod swtpm;
pub mod tls;
pub mod up;
pub mod verify_cmd;
