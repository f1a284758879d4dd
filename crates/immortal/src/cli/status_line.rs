//! Connection status on stderr, as a person at a terminal should see it.
//!
//! When stderr is a terminal (`connect` under ssh, which has put that terminal in raw mode),
//! the status is shown on the rows below the session's cursor, rewritten in place while the
//! link is down and erased once it is back, with the cursor put back where the session left
//! it: a healthy session shows nothing, and an outage leaves no trace but the row or two of a
//! full-screen program that the status covered (Ctrl-L redraws them). Elsewhere (a log file, a
//! pipe) every report is a line of its own, kept.
//!
//! On a terminal only control sequences move the cursor, never a bare `\n` (its meaning
//! depends on the terminal's output mode): `ESC D` (index) moves down a row, scrolling at the
//! bottom, and keeps the column; `ESC 7` and `ESC 8` save and restore the cursor (the
//! terminal has one such slot: a remote program that saved its cursor before an outage
//! restores ours after it). The session's output clears the line before it is written
//! ([`ClearingWriter`]), so bytes that arrive before the status hears the link is back are not
//! erased with it.

use std::io::{self, IsTerminal, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

use super::common::Status;

/// Where [`Status`] reports go: a terminal's status line, or plain lines.
#[derive(Debug)]
pub(crate) struct StatusOut {
    /// Whether stderr is a terminal.
    terminal: bool,
    line: Mutex<StatusLine>,
}

impl StatusOut {
    /// For this process's stderr.
    pub(crate) fn stderr() -> StatusOut {
        StatusOut {
            terminal: io::stderr().is_terminal(),
            line: Mutex::new(StatusLine::default()),
        }
    }

    /// Shows `status`.
    pub(crate) fn show(&self, status: Status) {
        if !self.terminal {
            let _ = io::stderr().write_all(format!("immortal: {}\n", status.text()).as_bytes());
            return;
        }
        // Written under the lock, so that a `clear` cannot come between what the line is
        // taken to be and what the terminal shows.
        let mut line = self.line.lock().unwrap_or_else(PoisonError::into_inner);
        let text = line.render(&status, terminal_width());
        let _ = io::stderr().write_all(text.as_bytes());
    }

    /// Erases the status line if one is shown, and puts the cursor back where the session left
    /// it: done before the session writes to the terminal, so that what it writes (bytes
    /// replayed after a resume, which may come before the status is told the link is back)
    /// lands where the session's cursor was, and is not erased with the line.
    pub(crate) fn clear(&self) {
        if !self.terminal {
            return;
        }
        let mut line = self.line.lock().unwrap_or_else(PoisonError::into_inner);
        if line.shown.is_some() {
            let text = line.render(&Status::Back(String::new()), terminal_width());
            let _ = io::stderr().write_all(text.as_bytes());
        }
    }
}

/// A writer of the session's output that clears the status line (see [`StatusOut::clear`])
/// before each write.
pub(crate) struct ClearingWriter<W> {
    inner: W,
    status: Arc<StatusOut>,
}

impl<W> ClearingWriter<W> {
    /// `inner`, clearing `status` before each write.
    pub(crate) fn new(inner: W, status: Arc<StatusOut>) -> Self {
        ClearingWriter { inner, status }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ClearingWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.status.clear();
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Stderr's width in columns now (it may have been resized since the last status).
fn terminal_width() -> usize {
    rustix::termios::tcgetwinsize(io::stderr())
        .ok()
        .map(|size| usize::from(size.ws_col))
        .filter(|&cols| cols > 0)
        .unwrap_or(80)
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

/// The terminal's status line: how many rows of it are on screen, if any.
#[derive(Debug, Default)]
struct StatusLine {
    shown: Option<usize>,
}

/// Saves the cursor (`ESC 7`).
const SAVE: &str = "\x1b7";
/// Restores the cursor saved by [`SAVE`] (`ESC 8`).
const RESTORE: &str = "\x1b8";

impl StatusLine {
    /// The bytes that turn what is on screen into `status` on a terminal `width` columns wide.
    ///
    /// The first status makes room below the session's cursor (scrolling if it is near the
    /// bottom), saves the cursor there, and writes itself from the start of the next row. A
    /// later one erases the rows shown, from the saved cursor, and does the same. Once the link
    /// is back the rows are erased and the cursor restored.
    fn render(&mut self, status: &Status, width: usize) -> String {
        let mut out = String::new();
        if let Some(rows) = self.shown.take() {
            out.push_str(RESTORE);
            for _ in 0..rows {
                out.push_str("\x1b[1B\r\x1b[K");
            }
            out.push_str(RESTORE);
        }
        if let Status::Lost(text) = status {
            let line = format!("immortal: {text}");
            let rows = line.chars().count().div_ceil(width.max(1)).max(1);
            // Index down as many rows as the line takes (the screen scrolls if it must, the
            // session's text with it), then back up to the session's cursor, and save it.
            out.push_str(&"\x1bD".repeat(rows));
            out.push_str(&format!("\x1b[{rows}A"));
            out.push_str(SAVE);
            out.push_str("\x1b[1B\r");
            out.push_str(&line);
            self.shown = Some(rows);
        }
        out
    }
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
        let show = |text: &str| format!("\x1bD\x1b[1A\x1b7\x1b[1B\rimmortal: {text}");
        let erase = "\x1b8\x1b[1B\r\x1b[K\x1b8";
        assert_eq!(
            line.render(&lost("connection lost"), 80),
            show("connection lost")
        );
        assert_eq!(
            line.render(&lost("silent for 5 s"), 80),
            format!("{erase}{}", show("silent for 5 s"))
        );
        // Erased, and the cursor back where the session left it.
        assert_eq!(
            line.render(&Status::Back("reconnected after 6 s".into()), 80),
            erase
        );
        // Nothing is left to erase, and a healthy session prints nothing.
        assert_eq!(
            line.render(&Status::Back("reconnected after 1 s".into()), 80),
            ""
        );
        assert_eq!(line.render(&lost("lost again"), 80), show("lost again"));
    }

    #[test]
    fn a_line_wrapped_over_rows_has_room_made_for_it_and_is_erased_row_by_row() {
        let mut line = StatusLine::default();
        // "immortal: " and 35 more: 45 characters on a 20-column terminal, three rows.
        let shown = line.render(&lost(&"x".repeat(35)), 20);
        assert!(
            shown.starts_with("\x1bD\x1bD\x1bD\x1b[3A\x1b7\x1b[1B\r"),
            "{shown:?}"
        );
        assert_eq!(
            line.render(&Status::Back(String::new()), 20),
            "\x1b8\x1b[1B\r\x1b[K\x1b[1B\r\x1b[K\x1b[1B\r\x1b[K\x1b8"
        );
        // Exactly the width: one row.
        let shown = line.render(&lost(&"y".repeat(10)), 20);
        assert!(shown.starts_with("\x1bD\x1b[1A"), "{shown:?}");
        assert_eq!(
            line.render(&Status::Back(String::new()), 20),
            "\x1b8\x1b[1B\r\x1b[K\x1b8"
        );
    }

    #[test]
    fn no_bare_newline_moves_the_cursor_on_a_terminal() {
        let mut line = StatusLine::default();
        for status in [lost("a"), lost("b"), Status::Back("c".into())] {
            let out = line.render(&status, 80);
            assert!(!out.contains('\n'), "{out:?}");
        }
    }
}
