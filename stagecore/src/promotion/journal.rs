//! The promotion journal: one append-only JSON-lines file per promotion,
//! `<state_dir>/journal/<promotion-id>.jsonl`, each line a [`JournalEntry`] written and fsync'd
//! *before* the step it names happens (the `done` and `finished` lines record what happened).
//!
//! The file is held with an exclusive [`LockFile`] lock (a POSIX record lock: never inherited by
//! a forked child, dropped by the kernel when its holder dies) for the promotion's whole life, so
//! recovery can tell a live promotion (lock busy) from a dead one (lock free). A torn last line (the process
//! died mid-write) is ignored and cut off before anything is appended. The file is removed once
//! the promotion's receipt is archived and its `finished` line written.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::fsutil::{blocking, io_err, remove_durably, sync_dir};
use super::lockfile::{LockAttempt, LockFile};
use super::types::{Approval, Outcome, PreconditionPolicy, StepRecord, Strategy};
use crate::drift::DriftReport;
use crate::{ChangeSet, EnvironmentSpec, Error, Result};

/// What a promotion is about to do, written in its first journal line (everything recovery needs
/// without the original request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Promotion id (`pr-…`).
    pub id: String,
    /// Production environment.
    pub production: String,
    /// Stage environment.
    pub stage: String,
    /// Replay or swap.
    pub strategy: Strategy,
    /// Precondition policy.
    pub policy: PreconditionPolicy,
    /// Who asked.
    pub requested_by: String,
    /// The ChangeSets promoted (the stage's recorded ones).
    pub change_sets: Vec<ChangeSet>,
    /// Gate names, in order.
    pub gates: Vec<String>,
    /// Name of the pre-promotion snapshot of production.
    pub snapshot: String,
    /// Production's spec when the promotion started.
    pub production_spec: EnvironmentSpec,
    /// The stage's spec when the promotion started (what production must match afterwards).
    pub stage_spec: EnvironmentSpec,
    /// Whether any production machine was running (restarted after a swap or swap-back).
    pub production_running: bool,
    /// Each production machine's power state when the promotion started: what a rollback
    /// restores, and (for the machines the stage also has) what a commit leaves. Journals written
    /// before this field existed read as empty (then `production_running` decides).
    #[serde(default)]
    pub production_power: std::collections::BTreeMap<String, crate::PowerState>,
    /// Host of the promoting process.
    pub host: String,
    /// Pid of the promoting process.
    pub pid: u32,
    /// When the promotion started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
}

impl Plan {
    /// All changes of all ChangeSets, in order (journal `apply` lines index into this list).
    pub fn changes(&self) -> impl Iterator<Item = &crate::Change> {
        self.change_sets.iter().flat_map(|cs| &cs.changes)
    }
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// 1-based position in the journal.
    pub seq: u64,
    /// When it was written.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The promotion it belongs to.
    pub promotion: String,
    /// The step.
    #[serde(flatten)]
    pub step: JournalStep,
}

/// What a journal line says. All but `done` and `finished` are written before the step happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum JournalStep {
    /// The plan; about to take the production lock.
    Begin {
        /// The plan.
        plan: Box<Plan>,
    },
    /// About to check the precondition (computing the drift report).
    Precondition,
    /// About to take the pre-promotion snapshot.
    Snapshot {
        /// Its name.
        name: String,
    },
    /// Replay: about to apply change number `change` (index into all changes, in order).
    Apply {
        /// Index into [`Plan::changes`].
        change: usize,
        /// The change's kind (`set_memory`), for people reading the journal.
        kind: String,
    },
    /// Swap: about to call `Backend::swap(production, stage)`.
    Swap,
    /// About to verify production against the stage.
    Verify,
    /// About to run a gate.
    Gate {
        /// The gate's name.
        name: String,
    },
    /// Decided to commit: about to delete the pre-promotion snapshot. Recovery finishes a
    /// promotion whose journal holds this line.
    Commit,
    /// The precondition refused: production was not touched; only finishing remains.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Decided to roll back, and why.
    Rollback {
        /// Why.
        reason: String,
    },
    /// A step finished (with the drift report after the precondition, an approval after a gate).
    Done {
        /// The step with its timing and outcome.
        record: StepRecord,
        /// The accepted drift report (after `precondition`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drift: Option<Box<DriftReport>>,
        /// The approval a gate gave.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        approval: Option<Approval>,
    },
    /// The receipt is archived; what remains is releasing the lock and removing this file.
    Finished {
        /// How the promotion ended.
        outcome: Outcome,
    },
}

impl JournalStep {
    /// The line's `step` tag (`apply`, `done`, ...).
    pub fn tag(&self) -> &'static str {
        match self {
            JournalStep::Begin { .. } => "begin",
            JournalStep::Precondition => "precondition",
            JournalStep::Snapshot { .. } => "snapshot",
            JournalStep::Apply { .. } => "apply",
            JournalStep::Swap => "swap",
            JournalStep::Verify => "verify",
            JournalStep::Gate { .. } => "gate",
            JournalStep::Commit => "commit",
            JournalStep::Refuse { .. } => "refuse",
            JournalStep::Rollback { .. } => "rollback",
            JournalStep::Done { .. } => "done",
            JournalStep::Finished { .. } => "finished",
        }
    }
}

/// An open, locked journal file.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: Option<Arc<LockFile>>,
    next_seq: u64,
    promotion: String,
}

/// Outcome of opening an existing journal for recovery.
pub(crate) enum Opened {
    /// Held by us now, with its entries.
    Dead(Journal, Vec<JournalEntry>),
    /// Its promotion is alive (another process or engine holds the flock).
    Alive,
    /// The file is gone (finished meanwhile).
    Gone,
}

impl Journal {
    /// Creates the journal of a new promotion (fails if it exists) and takes its lock.
    pub(crate) async fn create(dir: &Path, promotion: &str) -> Result<Journal> {
        let path = dir.join(format!("{promotion}.jsonl"));
        let (p, d) = (path.clone(), dir.to_path_buf());
        let file = blocking(move || {
            drop(OpenOptions::new().append(true).create_new(true).open(&p).map_err(|e| io_err(&p, "create", e))?);
            let lock = match LockFile::try_lock(&p, None)? {
                LockAttempt::Acquired(lock, _) => lock,
                LockAttempt::Busy { .. } => {
                    return Err(io_err(
                        &p,
                        "lock",
                        std::io::Error::other("a new journal is locked by another process"),
                    ));
                }
            };
            sync_dir(&d)?;
            Ok(lock)
        })
        .await?;
        Ok(Journal { path, file: Some(Arc::new(file)), next_seq: 1, promotion: promotion.into() })
    }

    /// Opens an existing journal for recovery: takes its lock if its owner is dead, reads its
    /// entries, and cuts off a torn last line.
    pub(crate) async fn open_existing(path: PathBuf) -> Result<Opened> {
        blocking(move || {
            if !path.exists() {
                return Ok(Opened::Gone);
            }
            let lock = match LockFile::try_lock(&path, None)? {
                LockAttempt::Acquired(lock, _) => lock,
                LockAttempt::Busy { .. } => return Ok(Opened::Alive),
            };
            let mut f = lock.file();
            let mut text = String::new();
            f.seek(SeekFrom::Start(0))
                .and_then(|_| f.read_to_string(&mut text))
                .map_err(|e| io_err(&path, "read", e))?;
            let (entries, good_len) = parse(&path, &text)?;
            if good_len < text.len() {
                f.set_len(good_len as u64).and_then(|()| f.sync_data()).map_err(|e| io_err(&path, "truncate", e))?;
            }
            let promotion = match entries.first() {
                Some(e) => e.promotion.clone(),
                None => path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string(),
            };
            let next_seq = entries.last().map_or(1, |e| e.seq + 1);
            Ok(Opened::Dead(Journal { path, file: Some(Arc::new(lock)), next_seq, promotion }, entries))
        })
        .await
    }

    /// Appends one entry and fsyncs it. Returns the entry written.
    pub(crate) async fn append(&mut self, step: JournalStep) -> Result<JournalEntry> {
        let file = self.file.clone().ok_or_else(|| Error::backend_msg("promotion", "journal already closed"))?;
        let entry =
            JournalEntry { seq: self.next_seq, at: OffsetDateTime::now_utc(), promotion: self.promotion.clone(), step };
        let mut line = serde_json::to_vec(&entry).map_err(|e| Error::backend("promotion", e))?;
        line.push(b'\n');
        let path = self.path.clone();
        blocking(move || {
            let mut f = file.file();
            f.seek(SeekFrom::End(0))
                .and_then(|_| f.write_all(&line))
                .and_then(|()| f.sync_data())
                .map_err(|e| io_err(&path, "append", e))
        })
        .await?;
        self.next_seq += 1;
        Ok(entry)
    }

    /// Closes the file without touching it (the flock goes, as when a process dies).
    pub(crate) fn abandon(&mut self) {
        self.file = None;
    }

    /// Removes the file (the promotion is finished) and drops the flock.
    pub(crate) async fn remove(&mut self) -> Result<()> {
        let path = self.path.clone();
        let result = blocking(move || remove_durably(&path)).await;
        self.file = None;
        result
    }

    /// The promotion this journal belongs to.
    pub(crate) fn promotion(&self) -> &str {
        &self.promotion
    }
}

/// Parses journal text; returns the entries and the length of the well-formed prefix. Only the
/// last line may be torn; a bad line before it is corruption.
fn parse(path: &Path, text: &str) -> Result<(Vec<JournalEntry>, usize)> {
    let mut entries = Vec::new();
    let mut offset = 0;
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        let last = lines.peek().is_none();
        match (serde_json::from_str::<JournalEntry>(line.trim_end()), line.ends_with('\n')) {
            (Ok(e), true) => entries.push(e),
            // A torn tail: the process died while writing it; the step it names never began.
            (_, false) => break,
            _ if last => break,
            (Err(e), true) => {
                return Err(Error::invalid(
                    format!("{}:{}", path.display(), entries.len() + 1),
                    format!("corrupt journal line: {e}"),
                ));
            }
        }
        offset += line.len();
    }
    Ok((entries, offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_ignored_but_earlier_corruption_is_an_error() {
        let p = Path::new("j.jsonl");
        let good = r#"{"seq":1,"at":"2026-01-01T00:00:00Z","promotion":"pr-1","step":"precondition"}"#;
        let (entries, len) = parse(p, &format!("{good}\n{{\"seq\":2,\"at")).unwrap();
        assert_eq!((entries.len(), len), (1, good.len() + 1));
        assert_eq!(entries[0].step, JournalStep::Precondition);
        let err = parse(p, &format!("garbage\n{good}\n")).unwrap_err();
        assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "j.jsonl:1"), "{err}");
    }

    #[test]
    fn entries_round_trip_as_one_line_each() {
        let e = JournalEntry {
            seq: 7,
            at: OffsetDateTime::UNIX_EPOCH,
            promotion: "pr-1".into(),
            step: JournalStep::Apply { change: 0, kind: "set_memory".into() },
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"seq":7,"at":"1970-01-01T00:00:00Z","promotion":"pr-1","step":"apply","change":0,"kind":"set_memory"}"#
        );
        assert_eq!(serde_json::from_str::<JournalEntry>(&line).unwrap(), e);
    }
}
