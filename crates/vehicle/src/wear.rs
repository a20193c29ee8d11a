//! Battery wear: a semi-empirical NMC calendar + cycle model.
//!
//! Source: NREL BLAST-Lite (<https://github.com/NREL/BLAST-Lite>, BSD-3-Clause), model
//! `nmc111_gr_Kokam75Ah_2017` (Kokam 75 Ah NMC111/graphite pouch cell; aging data from
//! Smith et al., "Life prediction model for grid-connected Li-ion battery energy storage
//! system", ACC 2017, <https://ieeexplore.ieee.org/document/7963578>). Lithium-inventory
//! terms only:
//!
//! ```text
//! TN  = T / 308.15 K                 UaN = Ua(SoC) / 0.123 V
//! q1  = 2.66e7 · exp(−17.8 / TN) · exp(−5.21 · UaN / TN)     calendar rate
//! q3  = 3.80e3 · exp(−18.4 / TN) · exp(1.04 · exp(DOD²))     cycling rate
//! loss = q1 · t_days^0.357 + q3 · EFC^0.778                   (fraction of capacity)
//! ```
//!
//! `Ua` is the graphite anode potential versus lithium from the lithiation fraction
//! (M. Safari and C. Delacourt, J. Electrochem. Soc. 158(5) A562, 2011), as in BLAST-Lite.
//! The sigmoid active-material (LAM) term only matters near end of life and is left out;
//! the model has no C-rate term. Reference figures (FIELD-NOTES, from `blast-lite`): one year
//! at 25 °C loses 0.33 % at 30 % SoC, 1.02 % at 50 %, 1.95 % at 70 %, 4.73 % at 90 %.
//!
//! Attribution to compute uses the *marginal* loss given the pack's history: extra equivalent
//! full cycles (EFC) on top of the cycles the pack has already done, and extra calendar loss
//! only when the SoC was held higher for compute than it would otherwise have been.

use serde::Serialize;

/// Parameters of the NMC111 Kokam model (BLAST-Lite `_params_life`).
pub mod params {
    pub const Q1_0: f64 = 2.66e7;
    pub const Q1_1: f64 = -17.8;
    pub const Q1_2: f64 = -5.21;
    pub const Q2: f64 = 0.357;
    pub const Q3_0: f64 = 3.80e3;
    pub const Q3_1: f64 = -18.4;
    pub const Q3_2: f64 = 1.04;
    pub const Q4: f64 = 0.778;
    /// Temperature normalization, K (35 °C).
    pub const T_REF_K: f64 = 273.15 + 35.0;
    /// Anode potential normalization, V.
    pub const UA_REF_V: f64 = 0.123;
}

/// Graphite anode potential vs Li/Li+ at a state of charge in 0..=1 (Safari & Delacourt 2011).
pub fn anode_potential_v(soc: f64) -> f64 {
    let soc = soc.clamp(0.0, 1.0);
    let xa = 8.5e-3 + soc * (0.78 - 8.5e-3);
    0.6379 + 0.5416 * (-305.5309 * xa).exp() + 0.044 * (-(xa - 0.1958) / 0.1088).tanh()
        - 0.1978 * ((xa - 1.0571) / 0.0854).tanh()
        - 0.6875 * ((xa + 0.0117) / 0.0529).tanh()
        - 0.0175 * ((xa - 0.5692) / 0.0875).tanh()
}

/// Calendar rate q1 at a temperature (°C) and SoC (percent).
pub fn calendar_rate(temp_c: f64, soc_pct: f64) -> f64 {
    use params::*;
    let tn = (temp_c + 273.15) / T_REF_K;
    let ua_n = anode_potential_v(soc_pct / 100.0) / UA_REF_V;
    Q1_0 * (Q1_1 / tn).exp() * (Q1_2 * ua_n / tn).exp()
}

/// Cycling rate q3 at a temperature (°C) and depth of discharge (0..=1).
pub fn cycle_rate(temp_c: f64, dod: f64) -> f64 {
    use params::*;
    let tn = (temp_c + 273.15) / T_REF_K;
    Q3_0 * (Q3_1 / tn).exp() * (Q3_2 * (dod * dod).exp()).exp()
}

/// Calendar capacity loss (fraction) after `days` at constant temperature and SoC.
pub fn calendar_loss(temp_c: f64, soc_pct: f64, days: f64) -> f64 {
    calendar_rate(temp_c, soc_pct) * days.max(0.0).powf(params::Q2)
}

/// Cycling capacity loss (fraction) after `efc` equivalent full cycles.
pub fn cycle_loss(temp_c: f64, dod: f64, efc: f64) -> f64 {
    cycle_rate(temp_c, dod) * efc.max(0.0).powf(params::Q4)
}

/// Battery wear attributed to compute.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Wear {
    /// Capacity lost, fraction of the pack (0.0001 = 0.01 %).
    pub capacity_fraction: f64,
    /// Replacement cost of that capacity, $.
    pub usd: f64,
}

impl Wear {
    /// Percent of pack capacity.
    pub fn capacity_percent(&self) -> f64 {
        self.capacity_fraction * 100.0
    }
}

impl std::ops::AddAssign for Wear {
    fn add_assign(&mut self, rhs: Wear) {
        self.capacity_fraction += rhs.capacity_fraction;
        self.usd += rhs.usd;
    }
}

/// Wear model for one vehicle: pack, history and price.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WearModel {
    /// Usable pack capacity, kWh.
    pub pack_capacity_kwh: f64,
    /// Replacement cost, $ per kWh of capacity.
    pub replacement_usd_per_kwh: f64,
    /// Age of the pack, days (calendar marginal rate falls with age).
    pub pack_age_days: f64,
    /// Equivalent full cycles the pack has done (cycle marginal rate falls with EFC).
    pub pack_efc: f64,
    /// Typical depth of discharge of the pack's driving cycles, 0..=1.
    pub typical_dod: f64,
}

impl WearModel {
    /// A model for a pack with one year and 100 cycles behind it, 80 % typical DOD.
    pub fn new(pack_capacity_kwh: f64, replacement_usd_per_kwh: f64) -> Self {
        WearModel {
            pack_capacity_kwh,
            replacement_usd_per_kwh,
            pack_age_days: 365.0,
            pack_efc: 100.0,
            typical_dod: 0.8,
        }
    }

    fn price(&self, fraction: f64) -> Wear {
        Wear {
            capacity_fraction: fraction,
            usd: fraction * self.pack_capacity_kwh * self.replacement_usd_per_kwh,
        }
    }

    /// Wear from drawing `battery_kwh` out of the pack for compute (it is recharged later,
    /// so the extra throughput is `battery_kwh / capacity` equivalent full cycles).
    pub fn cycle_wear(&self, battery_kwh: f64, battery_temp_c: f64) -> Wear {
        let extra_efc = battery_kwh.max(0.0) / self.pack_capacity_kwh;
        let base = self.pack_efc.max(0.0);
        let q3 = cycle_rate(battery_temp_c, self.typical_dod);
        let loss = q3 * ((base + extra_efc).powf(params::Q4) - base.powf(params::Q4));
        self.price(loss.max(0.0))
    }

    /// Extra calendar wear from holding the pack at `held_soc_pct` instead of
    /// `baseline_soc_pct` for `hours` (zero when the SoC was not held higher).
    pub fn calendar_hold_wear(
        &self,
        baseline_soc_pct: f64,
        held_soc_pct: f64,
        battery_temp_c: f64,
        hours: f64,
    ) -> Wear {
        if held_soc_pct <= baseline_soc_pct || hours <= 0.0 {
            return Wear::default();
        }
        let age = self.pack_age_days.max(0.0);
        let dt = (age + hours / 24.0).powf(params::Q2) - age.powf(params::Q2);
        let dq = calendar_rate(battery_temp_c, held_soc_pct)
            - calendar_rate(battery_temp_c, baseline_soc_pct);
        self.price((dq * dt).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_year_calendar_loss_matches_blast_lite_figures() {
        // FIELD-NOTES, computed with PyPI blast-lite: 25 °C, one year at constant SoC.
        for (soc, expected_pct) in [(30.0, 0.33), (50.0, 1.02), (70.0, 1.95), (90.0, 4.73)] {
            let got = calendar_loss(25.0, soc, 365.0) * 100.0;
            let rel = (got - expected_pct).abs() / expected_pct;
            assert!(rel < 0.05, "SoC {soc}%: {got:.3}% vs {expected_pct}%");
        }
        // 35 °C is roughly twice 25 °C
        let ratio = calendar_loss(35.0, 50.0, 365.0) / calendar_loss(25.0, 50.0, 365.0);
        assert!((1.7..2.5).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn cycle_loss_is_a_few_thousandths_of_a_percent_per_cycle() {
        // averaged over a typical life of ~1000 cycles at 80 % DOD
        let per_cycle_pct = cycle_loss(25.0, 0.8, 1000.0) * 100.0 / 1000.0;
        assert!((0.002..0.005).contains(&per_cycle_pct), "{per_cycle_pct}");
    }

    #[test]
    fn wear_is_monotonic_in_every_stressor() {
        let mut prev = 0.0;
        for soc in (0..=100).step_by(5) {
            let l = calendar_loss(25.0, f64::from(soc), 365.0);
            assert!(l > prev, "soc {soc}");
            prev = l;
        }
        let mut prev = 0.0;
        for t in -10..=50 {
            let l = calendar_loss(f64::from(t), 50.0, 365.0);
            assert!(l > prev, "temp {t}");
            prev = l;
        }
        let m = WearModel::new(75.0, 140.0);
        let mut prev = 0.0;
        for kwh in 1..=50 {
            let w = m.cycle_wear(f64::from(kwh), 25.0);
            assert!(w.usd > prev && w.capacity_fraction > 0.0);
            prev = w.usd;
        }
        let hot = m.cycle_wear(10.0, 40.0).usd;
        assert!(hot > m.cycle_wear(10.0, 25.0).usd);
    }

    #[test]
    fn calendar_hold_only_counts_a_higher_soc() {
        let m = WearModel::new(75.0, 140.0);
        assert_eq!(
            m.calendar_hold_wear(60.0, 50.0, 25.0, 10.0),
            Wear::default()
        );
        let w = m.calendar_hold_wear(50.0, 80.0, 25.0, 24.0);
        assert!(w.usd > 0.0);
        let w2 = m.calendar_hold_wear(50.0, 80.0, 25.0, 48.0);
        assert!(w2.usd > w.usd);
    }

    #[test]
    fn cost_scales_with_capacity_and_price() {
        let a = WearModel::new(75.0, 140.0).cycle_wear(7.5, 25.0);
        let b = WearModel::new(75.0, 280.0).cycle_wear(7.5, 25.0);
        assert!((b.usd / a.usd - 2.0).abs() < 1e-9);
        assert!((a.usd - a.capacity_fraction * 75.0 * 140.0).abs() < 1e-12);
    }
}
