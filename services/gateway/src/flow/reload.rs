//! The rules in force, and their reload from the rule file without a restart.
//!
//! The file's modification time and size are polled; when either changes, the file is read,
//! parsed and checked. A good file replaces the rules at once (unchanged rules keep their state);
//! a bad one is refused with an error log line naming the problem and
//! `gateway_rules_reload_failures_total`, and the last good rules stay in force. In Kubernetes
//! the file is a mounted ConfigMap: the kubelet swaps it atomically, and the poll sees the new
//! target's time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::CompiledRules;
use crate::rules::Rules;

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file did not change (or no file is configured).
    Unchanged,
    /// New rules are in force.
    Reloaded,
    /// The file changed but was refused; the previous rules stay.
    Rejected(String),
}

/// Identity of a file version: modification time and length.
type Stamp = (Option<SystemTime>, u64);

/// The stamp of a file that is not there.
const MISSING: Stamp = (None, u64::MAX);

#[derive(Debug)]
pub struct RulesStore {
    current: RwLock<Arc<CompiledRules>>,
    file: Option<PathBuf>,
    stamp: Mutex<Option<Stamp>>,
}

impl RulesStore {
    /// The given rules, no file (built-in defaults; tests).
    pub fn fixed(rules: Rules) -> Self {
        Self {
            current: RwLock::new(Arc::new(CompiledRules::compile(
                rules,
                None,
                Instant::now(),
            ))),
            file: None,
            stamp: Mutex::new(None),
        }
    }

    /// Loads the rule file once, at start-up: a bad file is an error here, since there are no
    /// earlier rules to keep.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = file else {
            return Ok(Self::fixed(Rules::default()));
        };
        let stamp =
            stamp(path).with_context(|| format!("reading the rule file {}", path.display()))?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the rule file {}", path.display()))?;
        let rules = Rules::from_toml(&text)
            .map_err(|e| anyhow::anyhow!("the rule file {} is not valid: {e}", path.display()))?;
        let store = Self {
            current: RwLock::new(Arc::new(CompiledRules::compile(
                rules,
                None,
                Instant::now(),
            ))),
            file: Some(path.to_owned()),
            stamp: Mutex::new(Some(stamp)),
        };
        tracing::info!(file = %path.display(), "flow rules loaded");
        Ok(store)
    }

    /// The rules in force.
    pub fn current(&self) -> Arc<CompiledRules> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts `rules` in force (validated first), keeping the state of unchanged rules.
    pub fn replace(&self, rules: Rules) -> Result<(), String> {
        rules.validate()?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let compiled = CompiledRules::compile(rules, Some(&current), Instant::now());
        *current = Arc::new(compiled);
        Ok(())
    }

    /// One poll: reloads the file if it changed since the last look.
    pub async fn check(&self) -> ReloadOutcome {
        let Some(path) = self.file.as_deref() else {
            return ReloadOutcome::Unchanged;
        };
        let (seen, missing) = match stamp(path) {
            Ok(s) => (s, None),
            Err(error) => (MISSING, Some(error)),
        };
        if *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) == Some(seen) {
            return ReloadOutcome::Unchanged;
        }
        if let Some(error) = missing {
            return self.reject(path, seen, format!("cannot read the rule file: {error}"));
        }
        let parsed = match tokio::fs::read_to_string(path).await {
            Ok(text) => Rules::from_toml(&text),
            Err(error) => Err(format!("cannot read the rule file: {error}")),
        };
        match parsed.and_then(|rules| self.replace(rules)) {
            Ok(()) => {
                *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
                metrics::counter!("gateway_rules_reloads_total").increment(1);
                tracing::info!(file = %path.display(), "flow rules reloaded");
                ReloadOutcome::Reloaded
            }
            Err(problem) => self.reject(path, seen, problem),
        }
    }

    /// Refuses a file version: logged and counted once per version, not at every poll.
    fn reject(&self, path: &Path, seen: Stamp, problem: String) -> ReloadOutcome {
        metrics::counter!("gateway_rules_reload_failures_total").increment(1);
        tracing::error!(
            file = %path.display(),
            error = %problem,
            "rule file rejected; the last good rules stay in force"
        );
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
        ReloadOutcome::Rejected(problem)
    }

    /// Polls every `interval` until `stop`.
    pub async fn run(&self, interval: Duration, stop: CancellationToken) {
        if self.file.is_none() {
            // Fixed rules: nothing to watch, but the task runs until its drain step like the
            // others (one that ends early has failed).
            stop.cancelled().await;
            return;
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            self.check().await;
        }
    }
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified().ok(), meta.len()))
}
