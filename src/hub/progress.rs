//! Download progress: a bar on a terminal, a plain line per tenth otherwise (logs, CI).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    size: Option<u64>,
    done: u64,
    last_tenth: u64,
}

impl Progress {
    pub fn new(label: &str, size: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match size {
                Some(s) => ProgressBar::new(s),
                None => ProgressBar::new_spinner(),
            };
            let style = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar
        });
        if bar.is_none() {
            eprintln!(
                "{label}: starting ({})",
                size.map_or("size unknown".into(), human)
            );
        }
        Self {
            bar,
            label: label.into(),
            size,
            done: 0,
            last_tenth: 0,
        }
    }

    pub fn advance(&mut self, n: u64) {
        self.done += n;
        match (&self.bar, self.size) {
            (Some(bar), _) => bar.inc(n),
            (None, Some(size)) if size > 0 => {
                let tenth = self.done * 10 / size;
                if tenth > self.last_tenth && tenth < 10 {
                    self.last_tenth = tenth;
                    eprintln!("{}: {}% ({})", self.label, tenth * 10, human(self.done));
                }
            }
            _ => {}
        }
    }

    pub fn finish(&mut self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => eprintln!("{}: done ({})", self.label, human(self.done)),
        }
    }
}

fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
