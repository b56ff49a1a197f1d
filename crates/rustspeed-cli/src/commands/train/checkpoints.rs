//! The output directory's checkpoints: finding the newest, rotating old ones away
//! (`--save-total-limit`), and trimming metrics to a resumed step.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::exit::UsageError;

/// `checkpoint-N` directories of `out`, oldest (smallest N) first.
pub fn checkpoints(out: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The `checkpoint-N` directory of `out` with the largest N.
pub fn latest_checkpoint(out: &Path) -> anyhow::Result<PathBuf> {
    let found = checkpoints(out)
        .map_err(|e| UsageError(format!("{}: cannot list checkpoints: {e}", out.display())))?;
    found.last().map(|(_, p)| p.clone()).ok_or_else(|| {
        UsageError(format!(
            "--resume-from-checkpoint: no checkpoint-N directory in {}",
            out.display()
        ))
        .into()
    })
}

/// HF's `_rotate_checkpoints`: keeps the `limit` newest checkpoints, deleting older ones.
/// Returns the deleted directories.
pub fn rotate(out: &Path, limit: usize) -> anyhow::Result<Vec<PathBuf>> {
    let found =
        checkpoints(out).with_context(|| format!("listing checkpoints in {}", out.display()))?;
    let excess = found.len().saturating_sub(limit.max(1));
    let mut deleted = Vec::new();
    for (_, dir) in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
        deleted.push(dir);
    }
    Ok(deleted)
}

/// Drops metric lines after the resumed step, so the file reads as one uninterrupted run.
pub fn truncate_metrics(path: &Path, step: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).with_context(|| format!("rewriting {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("rustspeed-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for n in [10, 2, 30, 4] {
            std::fs::create_dir_all(dir.join(format!("checkpoint-{n}"))).unwrap();
        }
        std::fs::create_dir_all(dir.join("final")).unwrap();
        std::fs::write(dir.join("checkpoint-99"), "a file, not a checkpoint").unwrap();
        let deleted = rotate(&dir, 2).unwrap();
        assert_eq!(
            deleted,
            vec![dir.join("checkpoint-2"), dir.join("checkpoint-4")]
        );
        let left: Vec<u64> = checkpoints(&dir).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(left, vec![10, 30]);
        assert!(dir.join("final").is_dir());
        assert_eq!(latest_checkpoint(&dir).unwrap(), dir.join("checkpoint-30"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
