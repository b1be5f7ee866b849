//! Progress of the long commands on standard error. On a terminal: a live bar with the rate and
//! the ETA (indicatif), and log lines printed above it. Not on a terminal (a log file, a pipe):
//! no bar, only the log lines (one per batch, or per attack iteration), each with the ETA.
//! With `--quiet`: nothing but warnings and errors.
//!
//! The rate and the ETA are the mean over the whole run, ours, not indicatif's: its estimate
//! weights each step by 0.1^(age / 15 s), made for many quick steps, and where a step takes minutes
//! (a bench row or an attack batch on the emulator or the CPU) it ran off to hours, or printed
//! u64::MAX seconds ("ETA 5124095576030431h 00m", seen in the GPU suite's smoke run).
use std::fmt::Write;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressState, ProgressStyle};

/// Where progress goes, decided once per run.
#[derive(Clone, Copy)]
pub struct Progress {
    quiet: bool,
    live: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress { quiet, live: !quiet && std::io::stderr().is_terminal() }
    }

    /// A bar of `total` units (`unit`: "steps", "images", ...), hidden when not live. A hidden
    /// bar still counts, so `eta` works for the log lines.
    pub fn bar(&self, total: u64, unit: &str) -> Bar {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if self.live { ProgressDrawTarget::stderr_with_hz(4) } else { ProgressDrawTarget::hidden() },
        );
        let template = format!("{{spinner}} {{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}})");
        let style = ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> ")
            .with_key("eta", |state: &ProgressState, w: &mut dyn Write| {
                let _ = w.write_str(&eta_text(state.pos(), state.len(), state.elapsed()));
            })
            .with_key("per_sec", |state: &ProgressState, w: &mut dyn Write| {
                let _ = w.write_str(&rate_text(state.pos(), state.elapsed()));
            });
        bar.set_style(style);
        // Cleared when dropped, also when a command fails half-way.
        let bar = bar.with_finish(ProgressFinish::AndClear);
        if self.live {
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        Bar { bar, quiet: self.quiet }
    }

    /// A line for the log (standard error), unless quiet.
    pub fn log(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }
}

/// One bar; its log lines go above it.
#[derive(Clone)]
pub struct Bar {
    bar: ProgressBar,
    quiet: bool,
}

impl Bar {
    pub fn inc(&self, units: u64) {
        self.bar.inc(units);
    }

    pub fn set_message(&self, message: impl Into<String>) {
        self.bar.set_message(message.into());
    }

    /// Remaining time at the mean rate so far, as "1m 05s"; "?" before anything is done.
    pub fn eta(&self) -> String {
        eta_text(self.bar.position(), self.bar.length(), self.bar.elapsed())
    }

    /// A log line, printed above the bar (or alone when there is none), unless quiet.
    pub fn log(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Time left for `length - position` units at the mean rate of the `position` done in `elapsed`,
/// as "1m 05s"; "?" before the first unit (or with no length).
fn eta_text(position: u64, length: Option<u64>, elapsed: Duration) -> String {
    let Some(length) = length.filter(|_| position > 0) else {
        return "?".into();
    };
    let seconds = (elapsed.as_secs_f64() * length.saturating_sub(position) as f64 / position as f64).round() as u64;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m {:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h {:02}m", seconds / 3600, (seconds % 3600) / 60),
    }
}

/// Units a second, the mean so far, to three significant figures or so.
fn rate_text(position: u64, elapsed: Duration) -> String {
    let rate = position as f64 / elapsed.as_secs_f64().max(1e-9);
    match rate {
        r if r >= 100.0 => format!("{r:.0}/s"),
        r if r >= 10.0 => format!("{r:.1}/s"),
        r => format!("{r:.2}/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_is_the_mean_rate_over_what_is_left() {
        let s = Duration::from_secs;
        assert_eq!(eta_text(0, Some(10), s(30)), "?");
        assert_eq!(eta_text(3, None, s(30)), "?");
        // Two bench rows of ten minutes each, five left: 50 minutes, however long ago the last was.
        assert_eq!(eta_text(2, Some(7), s(1200)), "50m 00s");
        assert_eq!(eta_text(1, Some(4), s(20)), "1m 00s");
        assert_eq!(eta_text(3, Some(3), s(90)), "0s");
        assert_eq!(eta_text(1, Some(100), s(3600)), "99h 00m");
        assert_eq!(rate_text(3, s(2)), "1.50/s");
        assert_eq!(rate_text(250, s(2)), "125/s");
        assert_eq!(rate_text(0, Duration::ZERO), "0.00/s");
    }
}
