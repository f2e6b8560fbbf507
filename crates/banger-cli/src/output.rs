//! Output helpers: JSON or human text, progress that is live on a terminal
//! and plain lines otherwise, and notices more than one command prints.

use std::io::IsTerminal;

/// Escapes control characters (an escape sequence, a carriage return, a
/// bell) in text that came from input, the guest or the network, so it
/// cannot drive the terminal it is printed on. Newlines and tabs stay:
/// multi-line messages (a serial console tail) are meant to be read.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A byte count for people: `512 B`, `3.4 KiB`, `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

pub fn print<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
    } else {
        human(v)
    }
}

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: std::cell::RefCell<String>,
}

impl Progress {
    pub fn new(title: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.set_prefix(title.to_string());
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b
        });
        if bar.is_none() {
            eprintln!("{title}");
        }
        Progress {
            bar,
            last: Default::default(),
        }
    }

    pub fn stage(&self, stage: &str, elapsed_ms: u64) {
        if *self.last.borrow() == stage {
            return;
        }
        *self.last.borrow_mut() = stage.to_string();
        match &self.bar {
            Some(b) => b.set_message(stage.to_string()),
            None => eprintln!("  [{:>6.1}s] {stage}", elapsed_ms as f64 / 1000.0),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Names the untracked files a workspace copy left out, and how to include them.
pub fn untracked_notice(skipped: &[String]) {
    if skipped.is_empty() {
        return;
    }
    let shown: Vec<&str> = skipped.iter().take(5).map(String::as_str).collect();
    let more = if skipped.len() > 5 {
        format!(" and {} more", skipped.len() - 5)
    } else {
        String::new()
    };
    eprintln!(
        "note: {} untracked file(s) not copied (add --include-untracked): {}{more}",
        skipped.len(),
        shown.join(", ")
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped_but_lines_kept() {
        assert_eq!(
            super::escape("a\u{1b}[31mred\rb\u{7}"),
            "a\\u{1b}[31mred\\rb\\u{7}"
        );
        assert_eq!(super::escape("line 1\nline 2\tx"), "line 1\nline 2\tx");
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(super::bytes(0), "0 B");
        assert_eq!(super::bytes(1023), "1023 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(512 << 20), "512.0 MiB");
        assert_eq!(super::bytes(u64::MAX), "16384.0 PiB");
    }
}
