//! Progress on stderr (never stdout): a bar when stderr is a terminal, otherwise a log line
//! at most every 10 s and one at the end.
use crate::util::hms;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    total: u64,
    done: u64,
    tokens: u64,
    start: Instant,
    last_log: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        let now = Instant::now();
        let bar = (std::io::stderr().is_terminal() && total > 0).then(|| {
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "lmgen: [{elapsed_precise}] {wide_bar} {pos}/{len} records, {msg}, ETA {eta}",
            ) {
                b.set_style(style);
            }
            b.set_message("0 tok/s");
            b.enable_steady_tick(Duration::from_millis(500));
            b
        });
        Self {
            total: total as u64,
            done: 0,
            tokens: 0,
            start: now,
            last_log: now,
            bar,
        }
    }

    fn rate(&self) -> f64 {
        let s = self.start.elapsed().as_secs_f64();
        if s > 0.0 {
            self.tokens as f64 / s
        } else {
            0.0
        }
    }

    pub fn records(&mut self, n: usize) {
        self.done += n as u64;
        if let Some(b) = &self.bar {
            b.set_position(self.done);
        }
        self.maybe_log();
    }

    pub fn tokens(&mut self, n: usize) {
        self.tokens += n as u64;
        if let Some(b) = &self.bar {
            b.set_message(format!("{:.0} tok/s", self.rate()));
        }
        self.maybe_log();
    }

    fn maybe_log(&mut self) {
        if self.bar.is_none() && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let elapsed = self.start.elapsed().as_secs_f64();
            let eta = if self.done > 0 {
                hms(elapsed / self.done as f64 * (self.total - self.done.min(self.total)) as f64)
            } else {
                "--:--".into()
            };
            eprintln!(
                "lmgen: {}/{} records, {:.0} tok/s, ETA {eta}",
                self.done,
                self.total,
                self.rate()
            );
        }
    }

    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!(
            "lmgen: {}/{} records, {:.0} tok/s, done in {}",
            self.done,
            self.total,
            self.rate(),
            hms(self.start.elapsed().as_secs_f64())
        );
    }
}
