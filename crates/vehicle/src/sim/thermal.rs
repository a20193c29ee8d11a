//! [`ComputeThermal`]: the first-order thermal model of the compute unit.

use serde::{Deserialize, Serialize};

/// First-order thermal model of the compute unit: `T' = (T_ambient + R_th·P − T) / τ`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ComputeThermal {
    /// Thermal resistance to ambient, K/W.
    pub r_th_k_per_w: f64,
    /// Time constant, s.
    pub tau_s: f64,
    /// Current temperature, °C.
    pub temp_c: f64,
}

impl ComputeThermal {
    /// Advance by `dt_s` with constant ambient and power (exact solution).
    pub fn step(&mut self, ambient_c: f64, power_w: f64, dt_s: f64) -> f64 {
        let steady = ambient_c + self.r_th_k_per_w * power_w;
        self.temp_c = steady + (self.temp_c - steady) * (-dt_s.max(0.0) / self.tau_s).exp();
        self.temp_c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thermal_model_is_first_order() {
        let mut th = ComputeThermal {
            r_th_k_per_w: 1.0,
            tau_s: 100.0,
            temp_c: 20.0,
        };
        th.step(20.0, 50.0, 100.0);
        // after one time constant: 63.2 % of the 50 K step
        assert!((th.temp_c - (20.0 + 50.0 * (1.0 - (-1.0f64).exp()))).abs() < 1e-9);
        for _ in 0..100 {
            th.step(20.0, 50.0, 100.0);
        }
        assert!((th.temp_c - 70.0).abs() < 1e-6);
    }
}
