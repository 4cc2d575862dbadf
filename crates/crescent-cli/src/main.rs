//! `crescent`: run Moondream 3 skills from the command line.
//!
//! ```text
//! crescent query   --model DIR --image PATH --question TEXT [--reasoning] [--spatial-ref x,y[,x2,y2]]...
//! crescent caption --model DIR --image PATH [--length short|normal|long]
//! crescent detect  --model DIR --image PATH --object TEXT [--max-objects N]
//! crescent point   --model DIR --image PATH --object TEXT [--max-objects N]
//!   common: [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--stats]
//!           [--hf-conventions] [--weights checkpoint|f32] [-v...]
//! ```
//!
//! stdout receives exactly one line: the output JSON object in the Moondream API shape.
//! Everything else (logs, `--stream` text, `--stats`, download progress) goes to stderr.
//! Errors are one `error: ...` line on stderr; the exit status is 2 for usage errors and 1 for
//! runtime errors (101 for an internal panic).

mod bench;
mod cli;
mod offline;
mod run;
mod serve;
mod synth;

use std::io::IsTerminal;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::Mutex;

use clap::error::ErrorKind;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::Cli;
use crate::run::{Failure, EXIT_USAGE};

/// Exit status after an internal panic (Rust's own convention).
const EXIT_PANIC: u8 = 101;

/// The last panic's one-line description, recorded by the hook and printed by `main` if the
/// panic reaches it (panics caught on the way, e.g. inside an image decoder, stay silent).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Collapse a message to one line (whitespace runs, newlines included, become one space).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Print `error: <message>` on one line.
fn print_error(msg: &str) {
    let msg = one_line(msg);
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    run::stderr_line(&format!("error: {msg}"));
}

/// Replace the default panic output (a multi-line "thread panicked" report) with a record
/// of the message; `main` prints it as one line.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic payload".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(format!("{}{at}", one_line(&msg)));
        }
    }));
}

/// A clap error as one line: the message up to the usage block, lines joined.
fn clap_error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let msg: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    format!("{}; see 'crescent --help'", msg.join(" "))
}

/// Install the stderr logger: RUST_LOG when set, else the `-v` level, else warnings only.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => EnvFilter::try_new(&s).unwrap_or_else(|e| {
            run::stderr_line(&format!(
                "warning: ignoring invalid RUST_LOG ({})",
                one_line(&e.to_string())
            ));
            EnvFilter::new(level)
        }),
        _ => EnvFilter::new(level),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Parse the arguments, run the command, map every failure to one stderr line and a status.
fn real_main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    // Help and version text (stdout for --help/--version).
                    let _ = e.print();
                    ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 })
                }
                _ => {
                    print_error(&clap_error_line(&e));
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    init_logging(cli.verbose);
    let result = match &cli.command {
        cli::Command::SynthCheckpoint(a) => synth::run(a),
        cli::Command::Bench(a) => bench::run(a),
        cli::Command::Serve(a) => serve::run(a),
        cmd => run::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            print_error(&format!("{error:#}"));
            ExitCode::from(code)
        }
    }
}

fn main() -> ExitCode {
    // Before any thread starts: keep activation buffers in malloc's heaps (see the function).
    crescent_kernels::tune_allocator();
    install_panic_hook();
    match catch_unwind(AssertUnwindSafe(real_main)) {
        Ok(code) => code,
        Err(_) => {
            let msg = LAST_PANIC
                .lock()
                .ok()
                .and_then(|mut m| m.take())
                .unwrap_or_else(|| "unknown panic".into());
            print_error(&format!(
                "internal error: {msg} (this is a bug in crescent; please report it)"
            ));
            ExitCode::from(EXIT_PANIC)
        }
    }
}
