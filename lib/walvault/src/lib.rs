//! walvault: PostgreSQL WAL archiving, base backups and point-in-time
//! recovery. This crate holds all the logic; the binaries `archive-push`,
//! `archive-fetch` and `walvault` only parse arguments and call it.
//!
//! Layers, each using only those below it:
//! - formats ([`walvault_formats`]): WAL names, segment headers, the object
//!   envelope — pure;
//! - [`storage`]: the [`storage::Storage`] trait, the local and the S3
//!   backends;
//! - [`repo`]: the repository layout and cluster identity; [`lock`];
//! - [`catalog`]: the SQLite index;
//! - [`plan`] and [`retention`]: the pure PITR and retention planners;
//! - commands: [`push`], [`fetch`], [`backup`], [`restore`], [`info`],
//!   [`rebuild`], [`init`], [`expire`], [`verify`], [`check`], [`drill`],
//!   [`keep`], [`sync`]; [`multi`] runs them over several repositories.
//!
//! ```
//! use walvault::config::{Config, Overrides};
//! use walvault::fetch::{fetch, FetchOutcome};
//!
//! let dir = std::env::temp_dir().join(format!("walvault-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let overrides = Overrides {
//!     repository: Some(dir.join("repo").display().to_string()),
//!     catalog: Some(dir.join("catalog.db")),
//!     ..Default::default()
//! };
//! let config = Config::load(&overrides, None).unwrap();
//! // Bind the repository to a cluster (normally: init_from_pgdata).
//! let identity = walvault_formats::wal::ClusterIdentity {
//!     system_id: walvault_formats::wal::SystemId(42),
//!     pg_version: walvault_formats::wal::PgVersion::new(15).unwrap(),
//!     segment_size: walvault_formats::wal::WalSegmentSize::DEFAULT,
//! };
//! walvault::init::init(&config, &identity).unwrap();
//! // A file the archive does not have is "missing", not an error.
//! let out = fetch(&config, "000000010000000000000001", &dir.join("x")).unwrap();
//! assert_eq!(out, FetchOutcome::Missing);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

pub mod async_push;
pub mod backup;
pub mod catalog;
pub mod check;
pub mod config;
pub mod drill;
pub mod error;
pub mod expire;
pub mod fetch;
pub mod info;
pub mod init;
pub mod keep;
pub mod lock;
pub mod multi;
pub mod pgdata;
pub mod plan;
pub mod prefetch;
pub mod probe;
pub mod push;
pub mod rebuild;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod spool;
pub mod storage;
pub mod sync;
#[cfg(test)]
mod testing;
pub mod verify;

pub use error::{Error, Result};
