//! Prometheus metrics, all described here, all prefixed `tokenfleet_`.

use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// HTTP requests by endpoint and status code.
    pub requests: IntCounterVec,
    /// Tokens received from agents (including ones later superseded).
    pub tokens_generated: IntCounter,
    /// Tokens accepted into a job's output (each index once).
    pub tokens_delivered: IntCounter,
    /// Jobs waiting for a vehicle, by class.
    pub queue_depth: IntGaugeVec,
    /// Connected nodes by governor state.
    pub nodes: IntGaugeVec,
    /// Jobs handed back by vehicles, by reason.
    pub evictions: IntCounterVec,
    /// Jobs continued on another vehicle from their generated tokens.
    pub resumes: IntCounter,
    /// Jobs taken from a silent node after its lease ran out.
    pub lease_expiries: IntCounter,
    /// Jobs ended, by outcome.
    pub jobs_finished: IntCounterVec,
    /// Requests refused for overload or quota, by reason.
    pub rejected: IntCounterVec,
    /// Time from a job entering the queue to its Assign being sent.
    pub dispatch_latency: Histogram,
    /// Time from job acceptance to its first token.
    pub ttft: Histogram,
    /// Compute energy of finished jobs as their vehicles reported it, by source (grid,
    /// battery) and quality (measured, estimated).
    pub energy_joules: CounterVec,
    /// Battery wear that energy caused, US dollars of pack value.
    pub battery_wear_usd: Counter,
    /// Jobs a node reported failed (JobFailed), by what the node claimed (retryable,
    /// permanent); the job moves on either way.
    pub node_job_failures: IntCounterVec,
    /// Node outputs refused as forged before any spot check (texts that are not their ids'
    /// detokenization, tokens past max_tokens or a stop string, an inconsistent finish).
    pub forged_outputs: IntCounter,
    /// Messages from nodes dropped by a per-session rate limit, by kind.
    pub node_messages_dropped: IntCounterVec,
    /// Node sessions closed, by reason (e.g. a State flood, a refused Hello).
    pub node_sessions_closed: IntCounterVec,
    /// Running jobs taken from a node that made no progress before their deadline.
    pub node_stalls: IntCounter,
    /// Nodes that stalled often enough to get no new work for a cool-down.
    pub node_cooldowns: IntCounter,
    /// Nodes whose claimed decode speed was replaced by their measured one for scheduling.
    pub node_speed_overclaims: IntCounter,
    /// Certificate requests refused, by reason.
    pub certificates_refused: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tokenfleet_requests_total",
                "HTTP requests by endpoint and status",
            ),
            &["endpoint", "status"],
        )
        .expect("valid metric");
        let tokens_generated = IntCounter::new(
            "tokenfleet_tokens_generated_total",
            "Tokens received from agents",
        )
        .expect("valid metric");
        let tokens_delivered = IntCounter::new(
            "tokenfleet_tokens_delivered_total",
            "Tokens accepted into job outputs, each once",
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new("tokenfleet_queue_depth", "Jobs waiting for a vehicle"),
            &["class"],
        )
        .expect("valid metric");
        let nodes = IntGaugeVec::new(
            Opts::new("tokenfleet_nodes", "Connected nodes by governor state"),
            &["state"],
        )
        .expect("valid metric");
        let evictions = IntCounterVec::new(
            Opts::new("tokenfleet_evictions_total", "Jobs handed back by vehicles"),
            &["reason"],
        )
        .expect("valid metric");
        let resumes = IntCounter::new(
            "tokenfleet_resumes_total",
            "Jobs continued on another vehicle from their tokens",
        )
        .expect("valid metric");
        let lease_expiries = IntCounter::new(
            "tokenfleet_lease_expiries_total",
            "Jobs taken from silent nodes",
        )
        .expect("valid metric");
        let jobs_finished = IntCounterVec::new(
            Opts::new("tokenfleet_jobs_finished_total", "Jobs ended by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new("tokenfleet_rejected_total", "Requests refused, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let buckets = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
        ];
        let dispatch_latency = Histogram::with_opts(
            HistogramOpts::new(
                "tokenfleet_dispatch_latency_seconds",
                "Queue entry to Assign sent",
            )
            .buckets(buckets.clone()),
        )
        .expect("valid metric");
        let ttft = Histogram::with_opts(
            HistogramOpts::new("tokenfleet_ttft_seconds", "Acceptance to first token")
                .buckets(buckets),
        )
        .expect("valid metric");
        let energy_joules = CounterVec::new(
            Opts::new(
                "tokenfleet_job_energy_joules_total",
                "Compute energy of finished jobs, by source and quality",
            ),
            &["source", "quality"],
        )
        .expect("valid metric");
        let battery_wear_usd = Counter::new(
            "tokenfleet_job_battery_wear_usd_total",
            "Battery wear caused by finished jobs, USD",
        )
        .expect("valid metric");
        let node_job_failures = IntCounterVec::new(
            Opts::new(
                "tokenfleet_node_job_failures_total",
                "Jobs nodes reported failed, by the node's claim",
            ),
            &["claim"],
        )
        .expect("valid metric");
        let forged_outputs = IntCounter::new(
            "tokenfleet_forged_outputs_total",
            "Node outputs refused as forged (text, token count or finish inconsistent)",
        )
        .expect("valid metric");
        let node_messages_dropped = IntCounterVec::new(
            Opts::new(
                "tokenfleet_node_messages_dropped_total",
                "Node messages dropped by a per-session rate limit, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let node_sessions_closed = IntCounterVec::new(
            Opts::new(
                "tokenfleet_node_sessions_closed_total",
                "Node sessions closed by the coordinator, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let node_stalls = IntCounter::new(
            "tokenfleet_node_stalls_total",
            "Running jobs taken from a node that made no progress before their deadline",
        )
        .expect("valid metric");
        let node_cooldowns = IntCounter::new(
            "tokenfleet_node_cooldowns_total",
            "Nodes given no new work for a cool-down after repeated stalls",
        )
        .expect("valid metric");
        let node_speed_overclaims = IntCounter::new(
            "tokenfleet_node_speed_overclaims_total",
            "Nodes scheduled at their measured decode speed, far below the one they claimed",
        )
        .expect("valid metric");
        let certificates_refused = IntCounterVec::new(
            Opts::new(
                "tokenfleet_certificates_refused_total",
                "Certificate requests refused, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(node_job_failures.clone()),
            Box::new(forged_outputs.clone()),
            Box::new(node_messages_dropped.clone()),
            Box::new(node_sessions_closed.clone()),
            Box::new(node_stalls.clone()),
            Box::new(node_cooldowns.clone()),
            Box::new(node_speed_overclaims.clone()),
            Box::new(certificates_refused.clone()),
            Box::new(energy_joules.clone()),
            Box::new(battery_wear_usd.clone()),
            Box::new(tokens_generated.clone()),
            Box::new(tokens_delivered.clone()),
            Box::new(queue_depth.clone()),
            Box::new(nodes.clone()),
            Box::new(evictions.clone()),
            Box::new(resumes.clone()),
            Box::new(lease_expiries.clone()),
            Box::new(jobs_finished.clone()),
            Box::new(rejected.clone()),
            Box::new(dispatch_latency.clone()),
            Box::new(ttft.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            tokens_generated,
            tokens_delivered,
            queue_depth,
            nodes,
            evictions,
            resumes,
            lease_expiries,
            jobs_finished,
            rejected,
            dispatch_latency,
            ttft,
            energy_joules,
            battery_wear_usd,
            node_job_failures,
            forged_outputs,
            node_messages_dropped,
            node_sessions_closed,
            node_stalls,
            node_cooldowns,
            node_speed_overclaims,
            certificates_refused,
        }
    }

    /// Counts a finished job's energy as its vehicle reported it in `JobDone`.
    pub fn record_job_energy(&self, grid_j: f64, battery_j: f64, measured: bool, wear_usd: f64) {
        let quality = if measured { "measured" } else { "estimated" };
        for (source, joules) in [("grid", grid_j), ("battery", battery_j)] {
            if joules.is_finite() && joules > 0.0 {
                self.energy_joules
                    .with_label_values(&[source, quality])
                    .inc_by(joules);
            }
        }
        if wear_usd.is_finite() && wear_usd > 0.0 {
            self.battery_wear_usd.inc_by(wear_usd);
        }
    }

    /// Adds a collector owned by another module (e.g. verification) to `/metrics`.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("metric names are unique");
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
