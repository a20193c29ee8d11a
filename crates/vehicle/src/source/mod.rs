//! Signal sources behind one trait.
//!
//! A [`SignalSource`] yields [`SignalUpdate`]s (`{ at, path, value }`, already resolved to a
//! [`crate::Signal`] and type-checked). Values of the wrong type and unknown paths are logged
//! with their path and skipped by the source; they never end the stream.
//!
//! - [`replay::ReplaySource`]: JSON lines `{"t": seconds | "RFC 3339", "path": "...", "value": ...}`
//!   at real, accelerated, or unthrottled speed.
//! - [`simulated::SimulatedSource`]: a [`crate::SimulatedVehicle`] emitting every signal per tick.
//! - [`kuksa::KuksaSource`] (feature `kuksa`): Eclipse Kuksa databroker, kuksa.val.v2 `Subscribe`,
//!   reconnecting with capped exponential backoff.
//!
//! [`AnySource`] picks one at run time.

use std::future::Future;

use thiserror::Error;

use crate::signals::{SignalUpdate, VehicleState};

#[cfg(feature = "kuksa")]
pub mod kuksa;
pub mod replay;
pub mod simulated;

/// Errors that end a source.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot read replay file: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid source configuration: {0}")]
    Config(String),
}

/// How fast a replayed or simulated source plays virtual time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// No waiting at all (tests, batch reports).
    AsFastAsPossible,
    /// Virtual seconds per real second (1.0 = real time, 60.0 = a minute per second).
    Speed(f64),
}

impl Pace {
    /// From a speed factor; `0` means as fast as possible.
    pub fn from_factor(f: f64) -> Result<Pace, SourceError> {
        if f == 0.0 {
            Ok(Pace::AsFastAsPossible)
        } else if f.is_finite() && f > 0.0 {
            Ok(Pace::Speed(f))
        } else {
            Err(SourceError::Config(format!(
                "speed factor {f} must be >= 0"
            )))
        }
    }
}

/// A stream of signal updates.
pub trait SignalSource: Send {
    /// The next update; `Ok(None)` when the source has ended (replays, bounded simulations).
    fn next_update(
        &mut self,
    ) -> impl Future<Output = Result<Option<SignalUpdate>, SourceError>> + Send;
}

/// Apply every update of a source to a state until the source ends; `on_update` runs after
/// each one (for example to step the governor or publish the state on a `watch` channel).
pub async fn drive<S: SignalSource>(
    source: &mut S,
    state: &mut VehicleState,
    mut on_update: impl FnMut(&VehicleState, &SignalUpdate) + Send,
) -> Result<(), SourceError> {
    while let Some(u) = source.next_update().await? {
        match state.apply(u) {
            Ok(_) => on_update(state, &u),
            Err(e) => tracing::warn!(path = %u.path, error = %e, "signal update rejected"),
        }
    }
    Ok(())
}

/// Any of the sources, chosen at run time.
pub enum AnySource {
    Replay(Box<replay::ReplaySource<tokio::fs::File>>),
    Simulated(Box<simulated::SimulatedSource>),
    #[cfg(feature = "kuksa")]
    Kuksa(Box<kuksa::KuksaSource>),
}

impl SignalSource for AnySource {
    async fn next_update(&mut self) -> Result<Option<SignalUpdate>, SourceError> {
        match self {
            AnySource::Replay(s) => s.next_update().await,
            AnySource::Simulated(s) => s.next_update().await,
            #[cfg(feature = "kuksa")]
            AnySource::Kuksa(s) => s.next_update().await,
        }
    }
}
