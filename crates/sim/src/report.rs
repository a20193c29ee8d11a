//! Building the [`RunReport`] from a finished simulation, and the readable text report.
//!
//! Owns: building and printing reports. May import: `metrics`, `scenario`, `vehicle_model`.

use std::fmt::Write;

use tokenfleet_scheduler::PolicyKind;

use crate::metrics::{CompareReport, Metrics, RunReport};
use crate::scenario::Scenario;
use crate::vehicle_model::wear_cost;

/// The report of a run from its (merged) metrics.
pub(crate) fn build(
    sc: &Scenario,
    policy: PolicyKind,
    seed: u64,
    days: f64,
    vehicles: u32,
    mut m: Metrics,
) -> RunReport {
    let delivered = m.delivered_int + m.delivered_batch;
    let pack_kwh: f64 = sc
        .archetypes
        .iter()
        .map(|a| a.share * a.battery_kwh as f64)
        .sum::<f64>()
        / sc.archetypes.iter().map(|a| a.share).sum::<f64>().max(1e-9);
    let wear = wear_cost(m.battery_kwh, pack_kwh, sc.economics.pack_cost_per_kwh);
    let revenue = m.delivered_int as f64 / 1e6 * sc.economics.price_per_mtok_interactive
        + m.delivered_batch as f64 / 1e6 * sc.economics.price_per_mtok_batch;
    let cost = m.energy_cost + wear;
    let calibration = m.calibration();
    RunReport {
        scenario: sc.name.clone(),
        policy: policy.to_string(),
        seed,
        vehicles,
        days,
        delivered_tokens: delivered,
        delivered_tokens_per_day: delivered as f64 / days,
        delivered_interactive: m.delivered_int,
        delivered_batch: m.delivered_batch,
        wasted_tokens: m.wasted,
        wasted_frac: if delivered + m.wasted == 0 {
            0.0
        } else {
            m.wasted as f64 / (delivered + m.wasted) as f64
        },
        wasted_breakdown: m.waste.clone(),
        reprefill_tokens: m.reprefill,
        evictions: m.evictions,
        preemptions: m.preemptions,
        interactive_jobs: m.int_jobs,
        slo_interactive: if m.int_jobs == 0 {
            1.0
        } else {
            m.int_slo_ok as f64 / m.int_jobs as f64
        },
        ttft_p50_ms: m.ttft_ms.percentile(0.5),
        ttft_p99_ms: m.ttft_ms.percentile(0.99),
        interactive_rejected: m.int_rejected,
        interactive_cut: m.int_cut,
        batch_jobs: m.batch_jobs,
        batch_completed: m.batch_completed,
        slo_batch: if m.batch_due == 0 {
            1.0
        } else {
            m.batch_on_time as f64 / m.batch_due as f64
        },
        batch_rejected: m.batch_rejected,
        energy_kwh_grid: m.grid_kwh,
        energy_kwh_battery: m.battery_kwh,
        energy_cost: m.energy_cost,
        wear_cost: wear,
        revenue,
        cost_per_mtok: if delivered == 0 {
            0.0
        } else {
            cost / (delivered as f64 / 1e6)
        },
        monthly_net_per_vehicle: (revenue - cost) / vehicles.max(1) as f64 * 30.0 / days,
        tokens_per_kwh: delivered as f64 / (m.grid_kwh + m.battery_kwh).max(1e-9),
        calibration,
        rejections: m.rejections,
        events: m.events,
        scheduler_calls: m.scheduler_calls,
        series: m.series,
    }
}

/// A readable report of one run.
pub fn text(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {} | policy {} | seed {} | {} vehicles | {:.2} days",
        r.scenario, r.policy, r.seed, r.vehicles, r.days
    );
    let _ = writeln!(
        s,
        "  delivered   {:>16} tokens ({:.3e}/day; interactive {}, batch {})",
        r.delivered_tokens, r.delivered_tokens_per_day, r.delivered_interactive, r.delivered_batch
    );
    let _ = writeln!(
        s,
        "  wasted      {:>16} tokens (wasted_frac {:.6}); re-prefill {} tokens; {} evictions, {} preemptions",
        r.wasted_tokens, r.wasted_frac, r.reprefill_tokens, r.evictions, r.preemptions
    );
    let w = &r.wasted_breakdown;
    let _ = writeln!(
        s,
        "  waste: lost on eviction {}, re-prefill {}, partial answers of refused jobs {}",
        w.lost_on_eviction, w.reprefill, w.refused_partial
    );
    let _ = writeln!(
        s,
        "  interactive SLO {:.3} (TTFT p50 {:.0} ms, p99 {:.0} ms; {} jobs, {} rejected, {} cut)",
        r.slo_interactive,
        r.ttft_p50_ms,
        r.ttft_p99_ms,
        r.interactive_jobs,
        r.interactive_rejected,
        r.interactive_cut
    );
    let _ = writeln!(
        s,
        "  batch SLO {:.3} ({} jobs, {} completed, {} rejected)",
        r.slo_batch, r.batch_jobs, r.batch_completed, r.batch_rejected
    );
    let _ = writeln!(
        s,
        "  energy grid {:.1} kWh, battery {:.1} kWh, cost {:.2}; wear {:.2}; {:.0} tokens/kWh",
        r.energy_kwh_grid, r.energy_kwh_battery, r.energy_cost, r.wear_cost, r.tokens_per_kwh
    );
    let _ = writeln!(
        s,
        "  revenue {:.2}; cost/Mtok {:.4}; monthly net per vehicle {:.2}",
        r.revenue, r.cost_per_mtok, r.monthly_net_per_vehicle
    );
    let c = &r.calibration;
    let _ = writeln!(
        s,
        "  departure forecast calibration ({} placements): levels {:?} observed {:?} (MAE {:.3})",
        c.samples,
        c.levels,
        c.observed
            .iter()
            .map(|o| (o * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>(),
        c.mean_abs_error
    );
    s
}

/// A comparison table (markdown).
pub fn compare_table(c: &CompareReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "scenario {} | seed {}\n", c.scenario, c.seed);
    let _ = writeln!(
        s,
        "| policy | delivered tokens | vs oracle | wasted_frac | SLO interactive | TTFT p99 ms | SLO batch | grid kWh | battery kWh | wear | cost/Mtok | net/vehicle/month |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let oracle = c
        .policies
        .get("oracle")
        .map_or(0, |r| r.delivered_tokens)
        .max(1);
    for name in ["random", "first-fit", "tokenfleet", "oracle"] {
        if let Some(r) = c.policies.get(name) {
            let _ = writeln!(
                s,
                "| {} | {} | {:.4} | {:.6} | {:.4} | {:.0} | {:.3} | {:.0} | {:.0} | {:.2} | {:.4} | {:.2} |",
                name,
                r.delivered_tokens,
                r.delivered_tokens as f64 / oracle as f64,
                r.wasted_frac,
                r.slo_interactive,
                r.ttft_p99_ms,
                r.slo_batch,
                r.energy_kwh_grid,
                r.energy_kwh_battery,
                r.wear_cost,
                r.cost_per_mtok,
                r.monthly_net_per_vehicle
            );
        }
    }
    s
}
