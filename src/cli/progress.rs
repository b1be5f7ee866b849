//! Progress of the long commands on standard error. On a terminal: a live bar with the rate and
//! the ETA (indicatif), and log lines printed above it. Not on a terminal (a log file, a pipe):
//! no bar, only the log lines (one per batch, or per attack iteration), each with the ETA.
//! With `--quiet`: nothing but warnings and errors.
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

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
        bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
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

    /// Remaining time at the rate so far, as "1m 05s"; "?" before anything is done.
    pub fn eta(&self) -> String {
        if self.bar.position() == 0 {
            return "?".into();
        }
        let seconds = self.bar.eta().as_secs();
        match seconds {
            0..60 => format!("{seconds}s"),
            60..3600 => format!("{}m {:02}s", seconds / 60, seconds % 60),
            _ => format!("{}h {:02}m", seconds / 3600, (seconds % 3600) / 60),
        }
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
