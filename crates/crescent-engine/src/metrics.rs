//! Engine metrics, updated lock-free by the engine thread and read by `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Histogram bucket upper bounds in seconds (TTFT and latency).
pub const BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0,
];

/// A cumulative histogram.
#[derive(Default, Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Record one observation in seconds.
    pub fn observe(&self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// (cumulative bucket counts, total count, sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        (
            self.counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            self.count.load(Ordering::Relaxed),
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// Counters and gauges of the engine.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Requests by (skill, status) where status is started / ok / error / cancelled.
    pub requests: Mutex<BTreeMap<(String, String), u64>>,
    /// Jobs waiting for admission.
    pub queue_depth: AtomicU64,
    /// Jobs in the running batch.
    pub running: AtomicU64,
    /// Prompt tokens prefilled (image prefixes from the cache excluded).
    pub tokens_in: AtomicU64,
    /// Tokens sampled.
    pub tokens_out: AtomicU64,
    /// KV blocks in use.
    pub kv_blocks_used: AtomicU64,
    /// KV blocks in the pool.
    pub kv_blocks_total: AtomicU64,
    /// Prefix-cache hits (vision encoder and image prefill skipped).
    pub prefix_hits: AtomicU64,
    /// Prefix-cache misses.
    pub prefix_misses: AtomicU64,
    /// Images in the prefix cache.
    pub prefix_cache_entries: AtomicU64,
    /// KV blocks held by the prefix cache (when idle, `kv_blocks_used` equals this).
    pub prefix_cache_blocks: AtomicU64,
    /// Images run through the vision encoder.
    pub vision_encodes: AtomicU64,
    /// Microseconds spent in the vision encoder.
    pub vision_us: AtomicU64,
    /// BOS + image prefills.
    pub image_prefills: AtomicU64,
    /// Batched forward passes.
    pub forward_passes: AtomicU64,
    /// Microseconds in batched forward passes.
    pub forward_us: AtomicU64,
    /// Time to first token.
    pub ttft: Histogram,
    /// Submission to completion.
    pub latency: Histogram,
}

impl Metrics {
    fn bump(&self, skill: &str, status: &str) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((skill.to_string(), status.to_string()))
                .or_insert(0) += 1;
        }
    }

    /// A request entered the queue.
    pub fn requests_started(&self, skill: &str) {
        self.bump(skill, "started");
    }

    /// A request ended with `status` (ok, error, cancelled, rejected...).
    pub fn requests_finished(&self, skill: &str, status: &str) {
        self.bump(skill, status);
    }

    /// A prefix-cache hit.
    pub fn prefix_hit(&self) {
        self.prefix_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A prefix-cache miss.
    pub fn prefix_miss(&self) {
        self.prefix_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a time to first token.
    pub fn observe_ttft(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// Record a request latency.
    pub fn observe_latency(&self, secs: f64) {
        self.latency.observe(secs);
    }

    /// Count of (skill, status).
    pub fn request_count(&self, skill: &str, status: &str) -> u64 {
        self.requests
            .lock()
            .map(|m| {
                m.get(&(skill.to_string(), status.to_string()))
                    .copied()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP crescent_requests_total Requests by skill and status."
        );
        let _ = writeln!(s, "# TYPE crescent_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((skill, status), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "crescent_requests_total{{skill=\"{skill}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let gauges: [(&str, &str, &str, u64); 14] = [
            (
                "crescent_queue_depth",
                "gauge",
                "Jobs waiting for admission.",
                g(&self.queue_depth),
            ),
            (
                "crescent_running_batch_size",
                "gauge",
                "Jobs in the running batch.",
                g(&self.running),
            ),
            (
                "crescent_tokens_in_total",
                "counter",
                "Prompt tokens prefilled.",
                g(&self.tokens_in),
            ),
            (
                "crescent_tokens_out_total",
                "counter",
                "Tokens generated.",
                g(&self.tokens_out),
            ),
            (
                "crescent_kv_blocks_used",
                "gauge",
                "KV cache blocks in use.",
                g(&self.kv_blocks_used),
            ),
            (
                "crescent_kv_blocks_free",
                "gauge",
                "KV cache blocks free.",
                g(&self.kv_blocks_total).saturating_sub(g(&self.kv_blocks_used)),
            ),
            (
                "crescent_kv_blocks_total",
                "gauge",
                "KV cache blocks in the pool.",
                g(&self.kv_blocks_total),
            ),
            (
                "crescent_prefix_cache_hits_total",
                "counter",
                "Image prefix reused.",
                g(&self.prefix_hits),
            ),
            (
                "crescent_prefix_cache_misses_total",
                "counter",
                "Image prefix computed.",
                g(&self.prefix_misses),
            ),
            (
                "crescent_prefix_cache_images",
                "gauge",
                "Images in the prefix cache.",
                g(&self.prefix_cache_entries),
            ),
            (
                "crescent_prefix_cache_blocks",
                "gauge",
                "KV blocks held by the prefix cache (all of kv_blocks_used when idle).",
                g(&self.prefix_cache_blocks),
            ),
            (
                "crescent_vision_encodes_total",
                "counter",
                "Images through the vision encoder.",
                g(&self.vision_encodes),
            ),
            (
                "crescent_image_prefills_total",
                "counter",
                "BOS + image prefills.",
                g(&self.image_prefills),
            ),
            (
                "crescent_forward_passes_total",
                "counter",
                "Batched decoder passes.",
                g(&self.forward_passes),
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        // Fractional seconds (an integer division would report 0 until a whole second).
        let _ = writeln!(
            s,
            "# HELP crescent_forward_seconds_total Seconds in batched decoder passes.\n\
             # TYPE crescent_forward_seconds_total counter\n\
             crescent_forward_seconds_total {}",
            g(&self.forward_us) as f64 / 1e6
        );
        for (name, help, h) in [
            ("crescent_ttft_seconds", "Time to first token.", &self.ttft),
            (
                "crescent_request_latency_seconds",
                "Submission to completion.",
                &self.latency,
            ),
        ] {
            let (counts, count, sum) = h.snapshot();
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (b, c) in BUCKETS.iter().zip(counts) {
                let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(
                s,
                "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
            );
        }
        s
    }
}
