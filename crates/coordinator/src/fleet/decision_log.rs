//! The optional decision log: every scheduler round of the dispatch loop as JSON lines, so a
//! live run can be replayed through the simulator's driver ("one code path") or audited.
//!
//! Format: the first line is a [`TraceHeader`] (policy, seed, scheduler config); every further
//! line is one [`TraceStep`]: the node changes since the previous round, in order, the queue the
//! scheduler saw and its decisions. [`read`] turns a log back into a [`SchedulerTrace`].
//!
//! The scheduler's recorder calls the sink synchronously inside `decide`, on the manager task; a
//! line is a few kilobytes for a small fleet, written through a buffer and flushed per round, so
//! a crash loses at most the round being written. It copies every changed node view: meant for
//! tests, audits and small fleets, not for a production fleet of thousands of vehicles.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use tokenfleet_scheduler::{Scheduler, SchedulerTrace, TraceHeader, TraceStep};

#[derive(Debug, thiserror::Error)]
pub enum DecisionLogError {
    #[error("decision log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("decision log {path} line {line}: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("decision log {0} is empty (no header line)")]
    Empty(PathBuf),
}

/// Create (truncate) the log at `path`, write the header and make `scheduler` append every
/// round. Call it before the first node is upserted.
pub fn attach(scheduler: &mut Scheduler, path: &Path) -> Result<(), DecisionLogError> {
    let io = |source| DecisionLogError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = BufWriter::new(File::create(path).map_err(io)?);
    serde_json::to_writer(&mut out, &scheduler.header())
        .map_err(std::io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(io)?;
    let shown = path.display().to_string();
    let mut failed = false;
    scheduler.record_to(Box::new(move |step: &TraceStep| {
        if failed {
            return;
        }
        let written = serde_json::to_writer(&mut out, step)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        if let Err(err) = written {
            // Logging is best effort: the fleet keeps serving, the operator is told once.
            tracing::error!(cause = %err, path = %shown, "decision log write failed; logging stopped");
            failed = true;
        }
    }));
    Ok(())
}

/// Read a decision log written by [`attach`].
pub fn read(path: &Path) -> Result<SchedulerTrace, DecisionLogError> {
    let file = File::open(path).map_err(|source| DecisionLogError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut trace: Option<SchedulerTrace> = None;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| DecisionLogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let parse = |source| DecisionLogError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        };
        match &mut trace {
            None => {
                let header: TraceHeader = serde_json::from_str(&line).map_err(parse)?;
                trace = Some(SchedulerTrace::from_header(header));
            }
            Some(t) => t.steps.push(serde_json::from_str(&line).map_err(parse)?),
        }
    }
    trace.ok_or_else(|| DecisionLogError::Empty(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfleet_scheduler::{
        DepartureForecast, JobClass, JobId, NodeId, NodeView, PolicyKind, QueuedJob,
    };

    fn node(id: u64) -> NodeView {
        NodeView {
            id: NodeId(id),
            models: vec!["m".into()],
            slots_total: 2,
            slots_busy: 0,
            decode_tps_single: 20.0,
            decode_tps_batched: 30.0,
            prefill_tps: 400.0,
            eligible: true,
            soc_pct: Some(80.0),
            soc_reserve_pct: 30.0,
            plugged_in: true,
            regions: vec!["eu".into()],
            tariff_per_kwh: 0.2,
            power_w: 300.0,
            link_rtt_ms: 20.0,
            reputation: 1.0,
            attested: true,
            departure: DepartureForecast::certain(0, 3_600_000),
            running_batch: vec![],
            oracle_departure: None,
        }
    }

    fn job(id: u64) -> QueuedJob {
        QueuedJob {
            id: JobId(id),
            class: JobClass::Interactive,
            model: "m".into(),
            prompt_tokens: 10,
            max_tokens: 20,
            generated_tokens: 0,
            deadline: None,
            residency: None,
            tenant: "t".into(),
            sensitive: false,
            enqueued_at: 0,
            running_on: None,
        }
    }

    #[test]
    fn a_written_log_reads_back_as_the_recorded_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let mut s = Scheduler::new(PolicyKind::Tokenfleet, 7);
        attach(&mut s, &path).unwrap();
        s.upsert_node(node(1));
        s.upsert_node(node(2));
        let first = s.decide(10, &[job(1), job(2), job(3)]);
        s.remove_node(NodeId(1));
        let second = s.decide(20, &[job(3)]);
        let trace = read(&path).unwrap();
        assert_eq!(trace.policy, PolicyKind::Tokenfleet);
        assert_eq!(trace.seed, 7);
        assert_eq!(trace.steps.len(), 2);
        assert_eq!(trace.steps[0].decisions, first);
        assert_eq!(trace.steps[0].nodes.len(), 2);
        assert_eq!(trace.steps[1].decisions, second);
        assert_eq!(first.assignments.len(), 3);
        assert_eq!(tokenfleet_scheduler::replay(&trace), Ok(()));
    }

    #[test]
    fn a_log_without_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.jsonl");
        std::fs::write(&path, "").unwrap();
        assert!(matches!(read(&path), Err(DecisionLogError::Empty(_))));
    }
}
