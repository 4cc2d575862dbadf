//! `crescent synth-checkpoint`: a random-weight checkpoint in the real HF layout, for loading
//! and benchmarking the full-size model without downloading it.

use std::time::Instant;

use crescent_model::synth::{preset, write_checkpoint};

use crate::cli::SynthArgs;
use crate::run::Failure;

/// The built-in tokenizer written when none is given (byte-level BPE, the fixture's).
const DEFAULT_TOKENIZER: &str = include_str!("../../../tests/fixtures/md3-tiny/tokenizer.json");

/// Write the checkpoint, config and tokenizer; progress on stderr.
pub fn run(a: &SynthArgs) -> Result<(), Failure> {
    let cfg = preset(&a.preset).map_err(Failure::usage)?;
    let t0 = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    write_checkpoint(
        &cfg,
        &a.out,
        a.shard_mb.max(1) << 20,
        a.seed,
        |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .map_err(Failure::runtime)?;
    bar.finish_and_clear();
    let tok_dst = a.out.join("tokenizer.json");
    match &a.tokenizer {
        Some(p) => std::fs::copy(p, &tok_dst).map(|_| ()),
        None => std::fs::write(&tok_dst, DEFAULT_TOKENIZER),
    }
    .map_err(|e| Failure::runtime(anyhow::anyhow!("writing {}: {e}", tok_dst.display())))?;
    eprintln!(
        "wrote {} ({}) in {:.1} s",
        a.out.display(),
        a.preset,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({"out": a.out.display().to_string(), "preset": a.preset})
    );
    Ok(())
}
