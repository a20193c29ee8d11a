//! A [`SimulatedVehicle`] as a [`SignalSource`]: every tick of virtual time it advances the
//! vehicle and emits every signal. The compute power it simulates is set through a
//! [`ComputePowerHandle`] (the agent writes its current power draw there).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Pace, SignalSource, SourceError};
use crate::signals::{Signal, SignalUpdate, SIGNAL_COUNT};
use crate::sim::SimulatedVehicle;
use crate::time::Millis;

/// Shared setter for the simulated compute power (W).
#[derive(Debug, Clone, Default)]
pub struct ComputePowerHandle(Arc<AtomicU64>);

impl ComputePowerHandle {
    /// Set the compute unit's power draw, W.
    pub fn set_w(&self, w: f64) {
        self.0.store(w.max(0.0).to_bits(), Ordering::Relaxed);
    }
    /// The current power draw, W.
    pub fn get_w(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A simulated vehicle as a source.
pub struct SimulatedSource {
    vehicle: SimulatedVehicle,
    tick: Duration,
    pace: Pace,
    end: Option<Millis>,
    power: ComputePowerHandle,
    pending: [Option<SignalUpdate>; SIGNAL_COUNT],
    next: usize,
    origin: Option<(tokio::time::Instant, Millis)>,
}

impl SimulatedSource {
    /// Emit every signal every `tick` of virtual time, until `end` (forever if `None`).
    pub fn new(
        vehicle: SimulatedVehicle,
        tick: Duration,
        pace: Pace,
        end: Option<Millis>,
    ) -> Result<Self, SourceError> {
        if tick.is_zero() {
            return Err(SourceError::Config(
                "simulation tick must be positive".into(),
            ));
        }
        let mut s = SimulatedSource {
            vehicle,
            tick,
            pace,
            end,
            power: ComputePowerHandle::default(),
            pending: [None; SIGNAL_COUNT],
            next: 0,
            origin: None,
        };
        s.fill();
        Ok(s)
    }

    /// The handle through which the compute power is set.
    pub fn compute_power(&self) -> ComputePowerHandle {
        self.power.clone()
    }

    /// The vehicle (for ground truth in tests).
    pub fn vehicle(&self) -> &SimulatedVehicle {
        &self.vehicle
    }

    fn fill(&mut self) {
        let now = self.vehicle.now();
        let st = self.vehicle.state();
        for s in Signal::ALL {
            self.pending[s.index()] = st.get(s, now).fresh().map(|value| SignalUpdate {
                at: now,
                path: s,
                value,
            });
        }
        self.next = 0;
    }
}

impl SignalSource for SimulatedSource {
    async fn next_update(&mut self) -> Result<Option<SignalUpdate>, SourceError> {
        loop {
            while self.next < SIGNAL_COUNT {
                let u = self.pending[self.next];
                self.next += 1;
                if u.is_some() {
                    return Ok(u);
                }
            }
            let now = self.vehicle.now() + self.tick;
            if self.end.is_some_and(|e| now > e) {
                return Ok(None);
            }
            if let Pace::Speed(f) = self.pace {
                let (start, t0) = *self
                    .origin
                    .get_or_insert_with(|| (tokio::time::Instant::now(), self.vehicle.now()));
                let target = start + Duration::from_secs_f64(now.ms_since(t0) as f64 / 1000.0 / f);
                tokio::time::sleep_until(target).await;
            }
            let w = self.power.get_w();
            self.vehicle.advance(now, w);
            self.fill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Schedule, VehicleParams};
    use crate::VehicleState;

    #[tokio::test]
    async fn emits_every_signal_each_tick_and_ends() {
        let t0 = Millis::from_secs(1_748_815_200);
        let v = SimulatedVehicle::new(
            Schedule::commuter_day(t0, false),
            VehicleParams::default(),
            3,
        );
        let mut src = SimulatedSource::new(
            v,
            Duration::from_secs(60),
            Pace::AsFastAsPossible,
            Some(t0 + Duration::from_secs(600)),
        )
        .unwrap();
        src.compute_power().set_w(20.0);
        let mut st = VehicleState::new();
        let mut n = 0;
        super::super::drive(&mut src, &mut st, |_, _| n += 1)
            .await
            .unwrap();
        assert_eq!(n, 11 * SIGNAL_COUNT, "initial state plus ten ticks");
        let end = t0 + Duration::from_secs(600);
        assert_eq!(st.compute_power_w(end).fresh(), Some(20.0));
        assert!(st.soc_percent(end).is_fresh());
    }
}
