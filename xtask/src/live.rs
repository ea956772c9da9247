//! The main job's live view: a progress bar over the buyers with a few live figures
//! (requests/s, accepted, stock left, the order queue, P99 so far), on stderr a few times a
//! second. indicatif draws nothing when stderr is not a terminal, so logs and CI stay quiet.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flash_sale_tests::report::Sampler;
use flash_sale_tests::scenario::LoadProgress;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// How often the figures are redrawn.
const REDRAW: Duration = Duration::from_millis(200);

/// A live view of one load, until [`Live::finish`].
pub(crate) struct Live {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Live {
    pub(crate) fn start(
        label: &str,
        buyers: usize,
        progress: Arc<LoadProgress>,
        sampler: Arc<Sampler>,
    ) -> Self {
        let bar = ProgressBar::new(buyers as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} buyers\n  {msg}",
            )
            .expect("a valid template"),
        );
        bar.set_prefix(label.to_owned());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(REDRAW);
                // requests/s over the last second: answers counted a second ago
                let mut window: std::collections::VecDeque<(Instant, usize)> = Default::default();
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let now = Instant::now();
                    let answers = progress.answers.load(Ordering::Relaxed);
                    window.push_back((now, answers));
                    while window.len() > 2
                        && now.duration_since(window[0].0) > Duration::from_secs(1)
                    {
                        window.pop_front();
                    }
                    let (then, before) = window[0];
                    let span = now.duration_since(then).as_secs_f64();
                    let rate = if span > 0.0 {
                        (answers - before) as f64 / span
                    } else {
                        0.0
                    };
                    let stores = sampler.latest().map_or_else(
                        || "stock ?  queue ?".to_owned(),
                        |s| format!("stock {}  queue {}", s.stock, s.queue),
                    );
                    bar.set_position(progress.buyers_done.load(Ordering::Relaxed) as u64);
                    bar.set_message(format!(
                        "{rate:>6.0} req/s  accepted {}  {stores}  p99 {:.0} ms",
                        progress.accepted.load(Ordering::Relaxed),
                        progress.latency_quantile_ms(0.99)
                    ));
                }
                bar.finish_and_clear();
            }
        });
        Self { stop, task }
    }

    pub(crate) async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
