//! [`VehicleParams`]: the physical parameters of a simulated vehicle, and the ambient
//! temperature they imply.

use serde::{Deserialize, Serialize};

use crate::time::Millis;

/// Physical parameters of a simulated vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VehicleParams {
    pub pack_capacity_kwh: f64,
    pub initial_soc_pct: f64,
    /// Charging stops here.
    pub charge_limit_pct: f64,
    pub charge_efficiency: f64,
    /// Whole-vehicle draw while awake for compute when parked (FIELD-NOTES: ~300 W).
    pub awake_overhead_w: f64,
    /// Auxiliary load while driving (HVAC, electronics), W.
    pub driving_aux_w: f64,
    /// The compute unit's own load while driving (ADAS etc.), W.
    pub driving_compute_w: f64,
    /// Local time offset, minutes (for the diurnal ambient temperature).
    pub utc_offset_min: i32,
    pub ambient_mean_c: f64,
    pub ambient_amplitude_c: f64,
    /// Compute unit sits this much above ambient with no load (cabin/enclosure).
    pub enclosure_offset_c: f64,
    pub compute_r_th_k_per_w: f64,
    pub compute_tau_s: f64,
    /// Battery temperature rise per W of battery power, K/W, and its time constant.
    pub battery_heat_k_per_w: f64,
    pub battery_tau_s: f64,
    /// Standard deviations of measurement noise.
    pub soc_noise_pct: f64,
    pub temp_noise_c: f64,
    pub voltage_noise_v: f64,
    /// Seconds between the driver switching on (12 V ON) and leaving Park.
    pub departure_prep_s: f64,
}

impl Default for VehicleParams {
    fn default() -> Self {
        VehicleParams {
            pack_capacity_kwh: 75.0,
            initial_soc_pct: 52.0,
            charge_limit_pct: 85.0,
            charge_efficiency: 0.92,
            awake_overhead_w: 300.0,
            driving_aux_w: 600.0,
            driving_compute_w: 25.0,
            utc_offset_min: 120,
            ambient_mean_c: 18.0,
            ambient_amplitude_c: 6.0,
            enclosure_offset_c: 4.0,
            compute_r_th_k_per_w: 1.0,
            compute_tau_s: 300.0,
            battery_heat_k_per_w: 0.0004,
            battery_tau_s: 3.0 * 3600.0,
            soc_noise_pct: 0.15,
            temp_noise_c: 0.2,
            voltage_noise_v: 0.02,
            departure_prep_s: 60.0,
        }
    }
}

impl VehicleParams {
    /// Ambient air temperature at `t`: a sinusoid with its minimum at 05:00 local time.
    pub fn ambient_c(&self, t: Millis) -> f64 {
        let h = t.ms_of_local_day(self.utc_offset_min) as f64 / 3_600_000.0;
        let phase = (h - 5.0) / 24.0 * std::f64::consts::TAU;
        self.ambient_mean_c - self.ambient_amplitude_c * phase.cos()
    }
}
