//! One way for every service to run and to stop: named tasks, one shutdown token, and a drain
//! in declared steps.
//!
//! A service declares its drain as steps, in the order they run, and spawns each task into the
//! step that stops it:
//!
//! ```text
//! stop accepting     the HTTP server stops taking connections and finishes its requests
//! flush the producer (order-service) what the broker has not acknowledged is delivered
//! stop jobs          consumers, schedules, reloaders finish the pass they are in
//! stop management    probes and scrapes answered to the end, then the listener closes
//! ```
//!
//! The drain starts when the shutdown token is cancelled (a signal, or a test) or when any task
//! ends by itself: every task is meant to run until its step stops it, so one that ends early
//! has failed, and the service stops rather than limp on without it. Readiness is on while
//! every task runs and off from the first moment of the drain. [`Supervisor::run`] answers which
//! task ended and why, so `main` can say it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use anyhow::anyhow;
use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::management::Readiness;

type BoxFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A step of the drain that stops tasks, as returned by [`Supervisor::stop_step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepId(usize);

enum Action {
    /// Cancels the step's token and waits for its tasks.
    Stop(CancellationToken),
    /// Runs once, after the steps before it.
    Run(BoxFuture),
}

struct Step {
    name: &'static str,
    action: Action,
}

/// The tasks of one service and the order they stop in.
pub struct Supervisor {
    service: &'static str,
    shutdown: CancellationToken,
    readiness: Readiness,
    steps: Vec<Step>,
    tasks: JoinSet<anyhow::Result<()>>,
    /// Which step and name each running task has.
    running: HashMap<Id, (usize, &'static str)>,
}

impl Supervisor {
    pub fn new(service: &'static str, shutdown: CancellationToken, readiness: Readiness) -> Self {
        Self {
            service,
            shutdown,
            readiness,
            steps: Vec::new(),
            tasks: JoinSet::new(),
            running: HashMap::new(),
        }
    }

    /// Declares the next step of the drain: it stops the tasks spawned into it.
    pub fn stop_step(&mut self, name: &'static str) -> StepId {
        self.steps.push(Step {
            name,
            action: Action::Stop(CancellationToken::new()),
        });
        StepId(self.steps.len() - 1)
    }

    /// Declares the next step of the drain as work of its own (a flush), run once the steps
    /// before it are done. Its error is reported, and the drain goes on.
    pub fn run_step(
        &mut self,
        name: &'static str,
        work: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.steps.push(Step {
            name,
            action: Action::Run(Box::pin(work)),
        });
    }

    /// Starts `task` now, with the token that `step` cancels: the task stops when it sees it.
    pub fn spawn<F, Fut>(&mut self, step: StepId, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let Action::Stop(token) = &self.steps[step.0].action else {
            unreachable!("a StepId names a stop step");
        };
        let handle = self.tasks.spawn(task(token.clone()));
        self.running.insert(handle.id(), (step.0, name));
    }

    /// Runs until the shutdown token is cancelled or a task ends, then drains step by step.
    /// `Ok` when a shutdown was asked for and every step went well; otherwise the error names
    /// the task that ended (or the step that failed) and why.
    pub async fn run(mut self) -> anyhow::Result<()> {
        self.readiness.set_ready(true);
        tracing::info!(service = self.service, "ready");
        let mut failures = Vec::new();
        tokio::select! {
            () = self.shutdown.cancelled() => {
                tracing::info!(service = self.service, "shutdown asked for; draining");
            }
            Some(joined) = self.tasks.join_next_with_id() => {
                let (_, name, outcome) = self.ended(joined);
                let failure = anyhow!("the task {name:?} ended before shutdown: {outcome}");
                tracing::error!(service = self.service, task = name, %outcome, "a task ended before shutdown; draining");
                failures.push(failure);
            }
        }
        self.readiness.set_ready(false);
        self.shutdown.cancel();

        let steps = std::mem::take(&mut self.steps);
        for (index, step) in steps.into_iter().enumerate() {
            let started = Instant::now();
            match step.action {
                Action::Stop(token) => {
                    token.cancel();
                    while self.running.values().any(|(s, _)| *s == index) {
                        let Some(joined) = self.tasks.join_next_with_id().await else {
                            break;
                        };
                        let (task_step, name, outcome) = self.ended(joined);
                        // A task of a later step that ends now has failed on its own.
                        if task_step != index || !outcome.is_ok() {
                            tracing::error!(service = self.service, task = name, %outcome, "a task failed during the drain");
                            failures.push(anyhow!("the task {name:?} failed: {outcome}"));
                        }
                    }
                }
                Action::Run(work) => {
                    if let Err(error) = work.await {
                        tracing::error!(service = self.service, step = step.name, %error, "a drain step failed");
                        failures.push(error.context(format!("the drain step {:?}", step.name)));
                    }
                }
            }
            tracing::info!(
                service = self.service,
                step = step.name,
                ms = started.elapsed().as_millis() as u64,
                "drain step done"
            );
        }
        tracing::info!(service = self.service, "stopped");
        if failures.is_empty() {
            return Ok(());
        }
        let all: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
        Err(anyhow!("{}: {}", self.service, all.join("; then ")))
    }

    /// Forgets an ended task: its step, its name, and how it ended.
    fn ended(
        &mut self,
        joined: Result<(Id, anyhow::Result<()>), JoinError>,
    ) -> (usize, &'static str, Outcome) {
        let (id, outcome) = match joined {
            Ok((id, Ok(()))) => (id, Outcome::Returned),
            Ok((id, Err(error))) => (id, Outcome::Failed(error)),
            Err(error) => (error.id(), Outcome::Panicked(panic_message(error))),
        };
        let (step, name) = self.running.remove(&id).unwrap_or((usize::MAX, "unknown"));
        (step, name, outcome)
    }
}

/// How a task ended.
enum Outcome {
    Returned,
    Failed(anyhow::Error),
    Panicked(String),
}

impl Outcome {
    fn is_ok(&self) -> bool {
        matches!(self, Self::Returned)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Returned => f.write_str("it returned"),
            Self::Failed(error) => write!(f, "{error:#}"),
            Self::Panicked(message) => write!(f, "it panicked: {message}"),
        }
    }
}

fn panic_message(error: JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string payload".to_owned()),
        Err(error) => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// A task that records when it was told to stop, then returns.
    fn until_stopped(
        log: &Arc<Mutex<Vec<String>>>,
        name: &'static str,
    ) -> impl FnOnce(CancellationToken) -> BoxFuture {
        let log = log.clone();
        move |stop| {
            Box::pin(async move {
                stop.cancelled().await;
                log.lock().unwrap().push(format!("stopped {name}"));
                Ok(())
            })
        }
    }

    fn service(
        shutdown: &CancellationToken,
        log: &Arc<Mutex<Vec<String>>>,
    ) -> (Supervisor, Readiness) {
        let readiness = Readiness::default();
        let mut s = Supervisor::new("test", shutdown.clone(), readiness.clone());
        let accept = s.stop_step("stop accepting");
        s.spawn(accept, "http server", until_stopped(log, "http server"));
        let flushed = log.clone();
        s.run_step("flush", async move {
            flushed.lock().unwrap().push("flushed".into());
            Ok(())
        });
        let jobs = s.stop_step("stop jobs");
        s.spawn(jobs, "job a", until_stopped(log, "job a"));
        s.spawn(jobs, "job b", until_stopped(log, "job b"));
        let mgmt = s.stop_step("stop management");
        s.spawn(mgmt, "management", until_stopped(log, "management"));
        (s, readiness)
    }

    #[tokio::test]
    async fn a_shutdown_drains_the_steps_in_their_order() {
        let (shutdown, log) = (CancellationToken::new(), Arc::default());
        let (supervisor, readiness) = service(&shutdown, &log);
        let run = tokio::spawn(supervisor.run());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(readiness.is_ready(), "ready while every task runs");
        shutdown.cancel();
        run.await.unwrap().expect("a clean drain");
        assert!(!readiness.is_ready());
        let log = log.lock().unwrap().clone();
        assert_eq!(log[..2], ["stopped http server", "flushed"]);
        let mut jobs = log[2..4].to_vec();
        jobs.sort();
        assert_eq!(jobs, ["stopped job a", "stopped job b"]);
        assert_eq!(log[4..], ["stopped management"]);
    }

    #[tokio::test]
    async fn a_task_that_ends_early_drains_everything_and_is_named() {
        let (shutdown, log) = (CancellationToken::new(), Arc::default());
        let (mut supervisor, _) = service(&shutdown, &log);
        let jobs = StepId(2);
        supervisor.spawn(jobs, "consumer", |_| async {
            Err(anyhow!("the broker refused us"))
        });
        let error = supervisor.run().await.expect_err("a failed task");
        let message = format!("{error:#}");
        assert!(message.contains("\"consumer\""), "{message}");
        assert!(message.contains("the broker refused us"), "{message}");
        assert!(shutdown.is_cancelled(), "the failure stopped the service");
        assert_eq!(log.lock().unwrap().len(), 5, "every step still ran");
    }

    #[tokio::test]
    async fn a_panic_is_reported_with_its_message() {
        let (shutdown, log) = (CancellationToken::new(), Arc::default());
        let (mut supervisor, _) = service(&shutdown, &log);
        fn explode() -> anyhow::Result<()> {
            panic!("boom")
        }
        supervisor.spawn(StepId(0), "handler", |_| async { explode() });
        let message = format!("{:#}", supervisor.run().await.expect_err("a panic"));
        assert!(
            message.contains("\"handler\"") && message.contains("boom"),
            "{message}"
        );
    }
}
