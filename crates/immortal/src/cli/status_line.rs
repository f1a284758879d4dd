//! Connection status on stderr, as a person at a terminal should see it.
//!
//! When stderr is a terminal (`connect` under ssh, which has put that terminal in raw mode),
//! the status is one line below the session's output, rewritten in place while the link is
//! down and erased once it is back: a healthy session shows nothing, and an outage leaves no
//! trace. Lines end with `\r\n`, since in raw mode a bare newline would not return the cursor.
//! Elsewhere (a log file, a pipe) every report is a line of its own, kept.

use std::io::{self, IsTerminal, Write};
use std::sync::{Mutex, PoisonError};

use super::common::Status;

/// Where [`Status`] reports go: a terminal's status line, or plain lines.
#[derive(Debug)]
pub(crate) struct StatusOut {
    /// The terminal's width in columns, if stderr is a terminal.
    terminal: Option<usize>,
    line: Mutex<StatusLine>,
}

impl StatusOut {
    /// For this process's stderr.
    pub(crate) fn stderr() -> StatusOut {
        let stderr = io::stderr();
        let terminal = stderr.is_terminal().then(|| {
            rustix::termios::tcgetwinsize(&stderr)
                .ok()
                .map(|size| usize::from(size.ws_col))
                .filter(|&cols| cols > 0)
                .unwrap_or(80)
        });
        StatusOut {
            terminal,
            line: Mutex::new(StatusLine::default()),
        }
    }

    /// Shows `status`.
    pub(crate) fn show(&self, status: Status) {
        let text = match self.terminal {
            Some(width) => self
                .line
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .render(&status, width),
            None => format!("immortal: {}\n", status.text()),
        };
        let _ = io::stderr().write_all(text.as_bytes());
    }
}

impl Drop for StatusOut {
    /// A status still shown when the program stops stays, ended, so what comes next on stderr
    /// (an error, say) starts on a line of its own.
    fn drop(&mut self) {
        let line = self.line.get_mut().unwrap_or_else(PoisonError::into_inner);
        if line.shown.take().is_some() {
            let _ = io::stderr().write_all(b"\r\n");
        }
    }
}

/// The terminal's status line: how many characters of it are on screen, if any.
#[derive(Debug, Default)]
struct StatusLine {
    shown: Option<usize>,
}

impl StatusLine {
    /// The bytes that turn what is on screen into `status` on a terminal `width` columns wide.
    fn render(&mut self, status: &Status, width: usize) -> String {
        let mut out = match self.shown.take() {
            Some(chars) => erase(chars, width),
            // Below whatever the session printed last, wherever its cursor was.
            None if matches!(status, Status::Lost(_)) => "\r\n".to_owned(),
            None => String::new(),
        };
        if let Status::Lost(text) = status {
            let line = format!("immortal: {text}");
            self.shown = Some(line.chars().count());
            out.push_str(&line);
        }
        out
    }
}

/// Erases a status line of `chars` characters that the terminal may have wrapped over several
/// rows, leaving the cursor at the start of its first row.
fn erase(chars: usize, width: usize) -> String {
    let rows = chars.div_ceil(width.max(1)).max(1);
    let mut out = String::from("\r\x1b[K");
    for _ in 1..rows {
        out.push_str("\x1b[1A\x1b[K");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(text: &str) -> Status {
        Status::Lost(text.to_owned())
    }

    #[test]
    fn a_status_line_is_rewritten_in_place_and_erased_when_the_link_is_back() {
        let mut line = StatusLine::default();
        assert_eq!(
            line.render(&lost("connection lost"), 80),
            "\r\nimmortal: connection lost"
        );
        assert_eq!(
            line.render(&lost("silent for 5 s"), 80),
            "\r\x1b[Kimmortal: silent for 5 s"
        );
        assert_eq!(
            line.render(&Status::Back("reconnected after 6 s".into()), 80),
            "\r\x1b[K"
        );
        // Nothing is left to erase, and a healthy session prints nothing.
        assert_eq!(
            line.render(&Status::Back("reconnected after 1 s".into()), 80),
            ""
        );
        assert_eq!(
            line.render(&lost("lost again"), 80),
            "\r\nimmortal: lost again"
        );
    }

    #[test]
    fn a_line_wrapped_over_rows_is_erased_row_by_row() {
        let mut line = StatusLine::default();
        // "immortal: " and 35 more: 45 characters on a 20-column terminal, three rows.
        line.render(&lost(&"x".repeat(35)), 20);
        assert_eq!(
            line.render(&Status::Back(String::new()), 20),
            "\r\x1b[K\x1b[1A\x1b[K\x1b[1A\x1b[K"
        );
        // Exactly the width: one row.
        line.render(&lost(&"y".repeat(10)), 20);
        assert_eq!(line.render(&Status::Back(String::new()), 20), "\r\x1b[K");
    }
}
