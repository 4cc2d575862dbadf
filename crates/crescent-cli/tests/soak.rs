//! The short soak run of `scripts/soak` against the test build of `crescent serve`: 16 clients
//! for 15 s of mixed, streaming, disconnecting and malformed requests plus an overload burst;
//! the script checks every response, the RSS, the idle metrics (no leaked KV blocks) and the
//! exit code after SIGTERM, and exits non-zero on any failure.

use std::process::Command;

#[test]
fn short_soak_passes() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("python3")
        .arg(format!("{root}/scripts/soak"))
        .args(["--binary", env!("CARGO_BIN_EXE_crescent")])
        .args(["--duration", "15", "--clients", "16", "--burst", "96"])
        .env_remove("RUST_LOG")
        .output()
        .expect("running python3 scripts/soak (python3 is required)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("PASSED"), "{stdout}");
}
