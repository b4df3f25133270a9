//! The main job — `cargo run --release` with no arguments — runs the demo and exits 0.
//! (The demo once failed whenever the entry processor's key belonged to the one member that
//! had not registered it; nothing else ran the binary.)

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_demo_runs_to_the_end() {
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_grid"));
    // The demo's own settings only: any GRID_* variable of the shell would override them.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("GRID_")) {
            command.env_remove(name);
        }
    }
    let out = command.output().expect("the grid binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the demo failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("done in"), "{stdout}");
    assert!(stdout.contains("visits = Some(200)"), "{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the demo took {:?}",
        started.elapsed()
    );
}
