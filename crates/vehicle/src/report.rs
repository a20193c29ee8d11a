//! The daily report: energy (grid/battery), wear, time in each governor state, tokens.

use std::fmt;
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::energy::{EnergySource, Kwh, Quality};
use crate::governor::GovernorState;
use crate::wear::Wear;

/// One local day of one vehicle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DailyReport {
    /// Local date, `YYYY-MM-DD`.
    pub date: String,
    /// Compute energy drawn from the grid.
    pub grid: Kwh,
    /// Compute energy drawn from the traction battery.
    pub battery: Kwh,
    /// Battery wear attributable to compute.
    pub wear: Wear,
    /// Time spent in each governor state (indexed like [`GovernorState::ALL`]).
    #[serde(serialize_with = "ser_states")]
    pub time_in_state: [Duration; 5],
    /// Tokens produced (fed in by the caller).
    pub tokens: u64,
}

fn ser_states<S: Serializer>(v: &[Duration; 5], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(5))?;
    for (st, d) in GovernorState::ALL.iter().zip(v) {
        m.serialize_entry(st.as_str(), &d.as_secs_f64())?;
    }
    m.end()
}

fn date_of(local_day: i64) -> String {
    // days since 1970-01-01 -> civil date (H. Hinnant's algorithm)
    let z = local_day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

impl DailyReport {
    /// An empty report for a local day number (days since the epoch).
    pub fn new(local_day: i64) -> DailyReport {
        DailyReport {
            date: date_of(local_day),
            grid: Kwh::default(),
            battery: Kwh::default(),
            wear: Wear::default(),
            time_in_state: [Duration::ZERO; 5],
            tokens: 0,
        }
    }

    pub(crate) fn add(&mut self, source: EnergySource, kwh: f64, quality: Quality, wear: Wear) {
        match source {
            EnergySource::Grid => self.grid.add(kwh, quality),
            EnergySource::Battery => self.battery.add(kwh, quality),
        }
        self.wear += wear;
    }

    /// Time spent in one state.
    pub fn time_in(&self, s: GovernorState) -> Duration {
        self.time_in_state[crate::energy::state_index(s)]
    }

    /// Grid + battery.
    pub fn total(&self) -> Kwh {
        self.grid.plus(self.battery)
    }

    /// Tokens per kWh of compute energy (`None` without energy).
    pub fn tokens_per_kwh(&self) -> Option<f64> {
        let e = self.total().kwh;
        (e > 0.0).then(|| self.tokens as f64 / e)
    }
}

fn hm(d: Duration) -> String {
    let m = d.as_secs() / 60;
    format!("{:>2}h{:02}m", m / 60, m % 60)
}

impl fmt::Display for DailyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "day {}", self.date)?;
        writeln!(f, "  energy   grid    {}", self.grid)?;
        writeln!(f, "           battery {}", self.battery)?;
        writeln!(f, "           total   {}", self.total())?;
        writeln!(
            f,
            "  wear     ${:.4} ({:.6}% of capacity)",
            self.wear.usd,
            self.wear.capacity_percent()
        )?;
        write!(f, "  time    ")?;
        for s in GovernorState::ALL {
            write!(f, " {} {}", s.as_str(), hm(self.time_in(s)))?;
        }
        writeln!(f)?;
        write!(f, "  tokens   {}", self.tokens)?;
        if let Some(tpk) = self.tokens_per_kwh() {
            write!(f, " ({tpk:.0} tokens/kWh)")?;
        }
        writeln!(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_display() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(20_241), "2025-06-02");
        assert_eq!(date_of(-1), "1969-12-31");
        let mut r = DailyReport::new(20_241);
        r.add(EnergySource::Grid, 1.5, Quality::Measured, Wear::default());
        r.add(
            EnergySource::Battery,
            0.5,
            Quality::Estimated,
            Wear {
                capacity_fraction: 1e-6,
                usd: 0.01,
            },
        );
        r.time_in_state[2] = Duration::from_secs(3 * 3600 + 120);
        r.tokens = 2_000_000;
        let s = r.to_string();
        assert!(s.contains("2025-06-02"), "{s}");
        assert!(s.contains("grid    1.500 kWh"), "{s}");
        assert!(s.contains("battery 0.500 kWh (estimated)"), "{s}");
        assert!(s.contains("total   2.000 kWh (estimated)"), "{s}");
        assert!(s.contains("computing  3h02m"), "{s}");
        assert!(s.contains("tokens   2000000 (1000000 tokens/kWh)"), "{s}");
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["time_in_state"]["computing"], 10_920.0);
        assert_eq!(j["battery"]["quality"], "Estimated");
        assert_eq!(j["tokens"], 2_000_000);
    }
}
