//! "Cost per segment does not grow with the archive": archive-push into a
//! catalog that already indexes a million segments, against an empty one.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use walvault::catalog::{Catalog, CatalogCluster, WalRecord};

use crate::compare::{CLUSTER, walvault_config, walvault_init};
use crate::ctx::{Ctx, remove_file, timed};
use crate::pg::{SEGMENT_BYTES, Segment, segment_name};
use crate::stats::Series;

/// The first segment number of the pre-filled rows: far above any segment
/// pgbench writes, so that no pushed name collides with them.
const FAR_SEGNO: u64 = 1 << 24;

/// The outcome of the comparison.
#[derive(Debug)]
pub struct Scale {
    /// Rows in the big catalog before the pushes.
    pub rows: u64,
    /// Seconds it took to build it.
    pub build_secs: f64,
    /// Size of the big catalog file.
    pub catalog_bytes: u64,
    /// Pushes with an empty catalog.
    pub empty: Series,
    /// Pushes with the big catalog.
    pub big: Series,
}

/// Builds a catalog of `rows` segment rows, then times `archive-push` of
/// the same `segments` into fresh repositories with the big catalog and
/// with an empty one, interleaved, `rounds` times.
pub fn measure(ctx: &Ctx, pgdata: &Path, segments: &[Segment], rows: u64, rounds: usize) -> Result<Scale> {
    let dir = ctx.mkdir("scale")?;
    let [big_repo, empty_repo] = [dir.join("repo-big"), dir.join("repo-empty")];
    let [big_cat, empty_cat] = [dir.join("big.db"), dir.join("empty.db")];
    let big_conf = walvault_config(ctx, "scale-big", &big_repo, &big_cat)?;
    let empty_conf = walvault_config(ctx, "scale-empty", &empty_repo, &empty_cat)?;

    eprintln!("walvault-bench: building a catalog of {rows} segments");
    let t = Instant::now();
    let identity = walvault::pgdata::identity_from_pgdata(pgdata).context("unable to read the cluster's identity")?;
    let cluster = CatalogCluster {
        name: CLUSTER.to_string(),
        // The string the config file holds: the catalog must be bound to the
        // very repository archive-push opens, or it is not updated.
        repository: big_repo.display().to_string(),
        identity,
    };
    let now = walvault::repo::now_ms();
    let records = (0..rows)
        .map(|i| {
            let segno = FAR_SEGNO + i;
            Ok(WalRecord {
                name: segment_name(1, segno).parse()?,
                segno: Some(segno),
                plain_size: SEGMENT_BYTES,
                stored_size: 3 << 20,
                blake3: format!("{i:064x}"),
                // One segment a minute, all in the past.
                archived_at_ms: now - i64::try_from(rows - i)? * 60_000,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    {
        let mut catalog = Catalog::open(&big_cat)?;
        catalog.replace_all(&cluster, &records, 0)?;
    }
    drop(records);
    let build_secs = t.elapsed().as_secs_f64();
    ctx.chown_tree(&dir)?;
    let catalog_bytes =
        fs::metadata(&big_cat).with_context(|| format!("unable to stat '{}'", big_cat.display()))?.len();

    let mut big = Series::new(format!("archive-push, catalog of {rows} segments"));
    let mut empty = Series::new("archive-push, empty catalog");
    for round in 0..rounds {
        // Fresh repositories each round: every push stores a new object.
        for repo in [&big_repo, &empty_repo] {
            match fs::remove_dir_all(repo) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("unable to remove '{}'", repo.display()));
                }
                _ => {}
            }
        }
        for suffix in ["", "-wal", "-shm"] {
            remove_file(Path::new(&format!("{}{suffix}", empty_cat.display())))?;
        }
        walvault_init(ctx, &big_conf, pgdata)?;
        walvault_init(ctx, &empty_conf, pgdata)?;
        for (i, seg) in segments.iter().enumerate() {
            let mut runs = [(&big_conf, &mut big), (&empty_conf, &mut empty)];
            if (i + round) % 2 == 1 {
                runs.reverse();
            }
            for (k, (conf, series)) in runs.into_iter().enumerate() {
                let mut cmd = ctx.walvault("archive-push");
                cmd.arg("--config").arg(conf).arg(&seg.path);
                let took = timed(cmd).with_context(|| format!("archive-push of '{}'", seg.name))?;
                series.push(took, format!("{},{k}", seg.name));
            }
        }
    }

    // The pushes must really have gone through the big catalog.
    let catalog = Catalog::open_existing(&big_cat)?;
    let newest = catalog.newest()?.map(|(name, _)| name).unwrap_or_default();
    if !segments.iter().any(|s| s.name == newest) {
        bail!("the big catalog's newest file is '{newest}', not a pushed segment: archive-push did not record to it");
    }
    let indexed: u64 = catalog.segment_runs()?.iter().map(|r| r.last - r.first + 1).sum();
    let expected = rows + segments.len() as u64;
    if indexed != expected {
        bail!("the big catalog indexes {indexed} segments, expected {expected}");
    }
    Ok(Scale { rows, build_secs, catalog_bytes, empty, big })
}
