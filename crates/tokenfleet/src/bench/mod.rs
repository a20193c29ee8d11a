//! Benchmarks. Each prints our figure next to a reference measured in the same run, on the
//! same machine, model and thread count, and their ratio (`dispatch` has no reference
//! implementation and prints the targets instead); none of them is a pass/fail test.
//! `chaos` is the exception that proves correctness rather than speed: it has no reference
//! implementation, compares every answer under network faults with the fault-free one, and
//! exits non-zero when an answer was lost, duplicated or changed.

pub mod chaos;
pub mod dispatch;
pub mod e2e;
mod e2e_batch;
pub mod engine;
pub mod reference;
mod scratch_db;
pub mod trust;

/// The sha256 a vehicle announces for its model file (coordinators refuse any other form).
pub async fn model_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    let path = path.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || tokenfleet_engine::gguf::sha256_file(&path)).await??)
}

/// Median of a sample (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Nearest-rank percentile (0 when empty).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&v), 3.0);
        assert_eq!(percentile(&v, 100.0), 5.0);
        assert_eq!(percentile(&v, 1.0), 1.0);
        assert_eq!(median(&[]), 0.0);
    }
}
