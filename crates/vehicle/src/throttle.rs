//! The throttle: a controller that holds compute-unit temperature and power under their
//! limits by lowering utilization smoothly (threads, batch size and duty cycle), not on/off.
//!
//! Two velocity-form PI loops, one on the temperature margin and one on the power margin;
//! the budget follows the lower of the two. The velocity form clamps the *output*, so the
//! integral cannot wind up while a loop is saturated or while the other loop is in charge
//! (anti-windup by construction). Without a measured power the power loop is a feed-forward
//! cap from the per-hardware power model.

use serde::Serialize;

use crate::policy::ComputeLimits;

/// What the engine may use: the controller's output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ComputeBudget {
    /// Engine threads.
    pub threads: u16,
    /// Maximum concurrent sequences (batch size).
    pub max_batch: u16,
    /// Fraction of each scheduling period the engine may spend decoding, 0..=1.
    pub duty_cycle: f64,
    /// Overall utilization 0..=1 (threads/max_threads × duty_cycle).
    pub utilization: f64,
}

impl ComputeBudget {
    /// Nothing may run.
    pub const ZERO: ComputeBudget = ComputeBudget {
        threads: 0,
        max_batch: 0,
        duty_cycle: 0.0,
        utilization: 0.0,
    };

    /// Map a utilization in 0..=1 onto threads, batch and duty cycle. Threads are the coarse
    /// step, duty cycle the fine one, so `threads × duty / max_threads == utilization`.
    pub fn from_utilization(u: f64, limits: &ComputeLimits) -> ComputeBudget {
        if u <= 0.0 || !u.is_finite() {
            return ComputeBudget::ZERO;
        }
        let u = u.min(1.0);
        let max_t = f64::from(limits.max_threads);
        let threads = ((u * max_t).ceil() as u16).clamp(1, limits.max_threads);
        let duty = (u * max_t / f64::from(threads)).clamp(0.0, 1.0);
        let batch = ((u * f64::from(limits.max_batch)).ceil() as u16).clamp(1, limits.max_batch);
        ComputeBudget {
            threads,
            max_batch: batch,
            duty_cycle: duty,
            utilization: u,
        }
    }

    /// True when nothing may run.
    pub fn is_zero(&self) -> bool {
        self.threads == 0
    }
}

/// Which limit is holding the budget down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Limiter {
    Temperature,
    Power,
}

/// Controller gains. The defaults suit a compute unit whose temperature settles in minutes
/// (first-order, τ ≈ 2–10 min, 20–40 K between idle and full load).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControllerParams {
    /// Utilization per kelvin of temperature margin change.
    pub kp_temp: f64,
    /// Utilization per kelvin·second of margin.
    pub ki_temp: f64,
    /// Integral gain of the power loop, per second, on the margin normalized by the
    /// hardware's power range (1/dt gives a dead-beat response).
    pub ki_power: f64,
    /// Lowest utilization the controller uses while computing.
    pub u_min: f64,
    /// Longest step the controller integrates over (longer gaps are clipped).
    pub max_dt_s: f64,
}

impl Default for ControllerParams {
    fn default() -> Self {
        ControllerParams {
            kp_temp: 0.03,
            ki_temp: 0.000_15,
            ki_power: 0.05,
            u_min: 0.05,
            max_dt_s: 60.0,
        }
    }
}

/// Controller state (a few floats: cheap to step, allocation-free).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleController {
    params: ControllerParams,
    u_temp: f64,
    u_power: f64,
    prev_temp_err: Option<f64>,
}

impl ThrottleController {
    /// A controller at full utilization.
    pub fn new(params: ControllerParams) -> Self {
        ThrottleController {
            params,
            u_temp: 1.0,
            u_power: 1.0,
            prev_temp_err: None,
        }
    }

    /// Back to full utilization (after a stop).
    pub fn reset(&mut self) {
        self.u_temp = 1.0;
        self.u_power = 1.0;
        self.prev_temp_err = None;
    }

    /// One control step. `temp_c` is the compute-unit temperature; `power_w` its measured
    /// power, if any. Returns the utilization and the limiting loop, if one is below 1.
    pub fn update(
        &mut self,
        limits: &ComputeLimits,
        temp_c: f64,
        power_w: Option<f64>,
        dt_s: f64,
    ) -> (f64, Option<Limiter>) {
        let p = self.params;
        let dt = dt_s.clamp(0.0, p.max_dt_s);

        // Temperature loop: aim at the restart threshold, below the hard limit.
        let setpoint = limits.max_temperature_c - limits.temperature_hysteresis_c;
        let err = setpoint - temp_c;
        let d_err = self.prev_temp_err.map_or(0.0, |prev| err - prev);
        self.prev_temp_err = Some(err);
        self.u_temp = (self.u_temp + p.kp_temp * d_err + p.ki_temp * dt * err).clamp(p.u_min, 1.0);

        // Power loop.
        self.u_power = match limits.max_power_w {
            None => 1.0,
            Some(limit) => match power_w {
                Some(measured) if measured.is_finite() => {
                    let range = limits.hardware.full_w - limits.hardware.idle_w;
                    let gain = (p.ki_power * dt).min(1.0);
                    (self.u_power + gain * (limit - measured) / range).clamp(p.u_min, 1.0)
                }
                _ => limits.hardware.utilization_for(limit).max(p.u_min),
            },
        };

        let u = self.u_temp.min(self.u_power);
        let limiter = if u >= 1.0 {
            None
        } else if self.u_temp <= self.u_power {
            Some(Limiter::Temperature)
        } else {
            Some(Limiter::Power)
        };
        (u, limiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HardwareProfile;

    fn limits() -> ComputeLimits {
        ComputeLimits {
            max_temperature_c: 80.0,
            temperature_hysteresis_c: 5.0,
            max_power_w: None,
            max_threads: 2,
            max_batch: 8,
            hardware: HardwareProfile {
                idle_w: 5.0,
                full_w: 35.0,
            },
        }
    }

    #[test]
    fn budget_mapping_is_monotonic_and_consistent() {
        let l = limits();
        let mut prev = 0.0;
        for i in 1..=100 {
            let u = f64::from(i) / 100.0;
            let b = ComputeBudget::from_utilization(u, &l);
            let eff = f64::from(b.threads) * b.duty_cycle / f64::from(l.max_threads);
            assert!((eff - u).abs() < 1e-9, "u={u} eff={eff}");
            assert!(eff >= prev);
            assert!(b.max_batch >= 1 && b.max_batch <= l.max_batch);
            prev = eff;
        }
        assert!(ComputeBudget::from_utilization(0.0, &l).is_zero());
        let full = ComputeBudget::from_utilization(1.0, &l);
        assert_eq!((full.threads, full.max_batch, full.duty_cycle), (2, 8, 1.0));
    }

    /// Closed loop against a first-order thermal plant: the controller settles near the
    /// setpoint, never crosses the hard limit, and moves smoothly (no on/off chatter).
    #[test]
    fn holds_temperature_below_the_limit_smoothly() {
        let l = limits();
        let mut c = ThrottleController::new(ControllerParams::default());
        let (ambient, r_th, tau) = (30.0, 1.5, 240.0); // full load would reach 82.5 °C
        let mut t = ambient + r_th * l.hardware.idle_w;
        let dt = 10.0;
        let mut last_u = 1.0;
        let mut max_t: f64 = 0.0;
        let mut max_jump: f64 = 0.0;
        for _ in 0..(6 * 360) {
            let (u, _) = c.update(&l, t, None, dt);
            max_jump = max_jump.max((u - last_u).abs());
            last_u = u;
            let p = l.hardware.power_w(u);
            let ss = ambient + r_th * p;
            t = ss + (t - ss) * (-dt / tau).exp();
            max_t = max_t.max(t);
        }
        assert!(max_t < l.max_temperature_c, "peak {max_t}");
        assert!((t - 75.0).abs() < 1.0, "settled at {t}");
        assert!(last_u > 0.5 && last_u < 1.0, "u={last_u}");
        assert!(max_jump < 0.2, "largest single-step change {max_jump}");
    }

    #[test]
    fn power_loop_converges_on_a_measured_power() {
        let mut l = limits();
        l.max_power_w = Some(20.0);
        let mut c = ThrottleController::new(ControllerParams::default());
        let mut u = 1.0;
        for _ in 0..20 {
            let measured = l.hardware.power_w(u) + 1.0; // model is a little optimistic
            let (nu, lim) = c.update(&l, 40.0, Some(measured), 10.0);
            u = nu;
            assert_eq!(lim, Some(Limiter::Power));
        }
        assert!((l.hardware.power_w(u) + 1.0 - 20.0).abs() < 0.1);
        // without a measurement: feed-forward from the model
        let (u, _) = c.update(&l, 40.0, None, 10.0);
        assert!((l.hardware.power_w(u) - 20.0).abs() < 1e-9);
    }
}
