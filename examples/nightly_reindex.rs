//! A small service run as two or three processes, each of which tries to run the nightly
//! reindex; a cluster lock guarded by `try_lock` makes one of them do it, and the fencing
//! token goes with every write to the index, which refuses writes with a smaller token than
//! the largest it saw (so a holder that was paused or cut off past its lease cannot
//! overwrite the work of the next one).
//!
//! ```sh
//! # three terminals (or `&`): every process runs the same program
//! cargo run --example nightly_reindex -- 127.0.0.1:5801 127.0.0.1:5801
//! cargo run --example nightly_reindex -- 127.0.0.1:5802 127.0.0.1:5801
//! cargo run --example nightly_reindex -- 127.0.0.1:5803 127.0.0.1:5801
//! ```
//!
//! Arguments: the address to bind, then seed addresses. "Night" comes every 10 seconds
//! here; the index is a file (`$TMPDIR/grid-reindex-index.txt`) standing in for a search
//! index or a table with a fence column (`UPDATE ... WHERE fence <= $token`).

use std::path::PathBuf;
use std::time::Duration;

use grid::Grid;

/// The resource the lock protects: it remembers the largest fencing token it saw and
/// refuses older ones. (A real one does the compare and the write atomically: a database
/// row's fence column, an object store's conditional put.)
struct FencedIndex {
    path: PathBuf,
}

impl FencedIndex {
    fn write(&self, token: u64, by: &str, doc: usize) -> Result<(), String> {
        let seen: u64 = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if token < seen {
            return Err(format!(
                "fencing token {token} < {seen}: a newer holder wrote since"
            ));
        }
        std::fs::write(&self.path, format!("{token} {by} doc {doc}\n")).map_err(|e| e.to_string())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:5801".into());
    let seeds: Vec<String> = args.collect();
    let grid = Grid::builder()
        .cluster_name("reindex-demo")
        .secret("reindex demo secret")
        .bind(&bind)
        .seeds(seeds)
        .start()
        .await?;
    let me = grid.cluster().local_member().id.to_string();
    let index = FencedIndex {
        path: std::env::temp_dir().join("grid-reindex-index.txt"),
    };
    let lock = grid.lock("nightly-reindex");
    let mut night = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = night.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let guard = match lock.try_lock().await {
            Ok(Some(guard)) => guard,
            Ok(None) => {
                println!("{me}: another member runs tonight's reindex");
                continue;
            }
            Err(e) => {
                println!("{me}: no reindex tonight: {e}");
                continue;
            }
        };
        let token = guard.fencing_token();
        println!("{me}: reindexing with fencing token {token}");
        let lost = guard.lost();
        tokio::pin!(lost);
        for doc in 0..5 {
            tokio::select! {
                _ = &mut lost => {
                    println!("{me}: lost the lock; stopping");
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if let Err(e) = index.write(token, &me, doc) {
                println!("{me}: the index refused a write: {e}");
                break;
            }
        }
        match guard.unlock().await {
            Ok(()) => println!("{me}: reindex done"),
            Err(e) => println!("{me}: reindex ended without the lock: {e}"),
        }
    }
    grid.shutdown().await;
    Ok(())
}
