//! The simulator's events, and the queue they wait in.
//!
//! Owns: [`Ev`] (what can happen) and the [`Events`] queue type.
//! May import: `queue`.

use crate::queue::EventQueue;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ev {
    Begin,
    Arrive(u32),
    Depart(u32),
    /// The vehicle's governor looks again (dwell over, SoC at the reserve or at start).
    Check(u32, u32),
    OutageStart(u32, u32),
    OutageEnd(u32),
    JobDone(u32, u32),
    Interactive,
    Dump(u32, u32),
    TraceNext,
    Dispatch,
    Sweep,
    Sample,
    End,
}

/// The calendar queue of one partition's events.
pub type Events = EventQueue<Ev>;
