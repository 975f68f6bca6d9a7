//! Where `txmap` and `txmapd` write their logs, and in which form.
//!
//! - **A terminal or a file** (the default): `TIMESTAMP LEVEL target: message fields` on
//!   stderr, colours only on a terminal and never with `NO_COLOR`.
//! - **The journal** (stderr is the stream systemd named in `JOURNAL_STREAM`, i.e. the
//!   service's stderr goes to journald): no timestamp (journald stamps each line) and no level
//!   word; each line starts with its syslog priority, sd-daemon style (`<3>` error,
//!   `<4>` warning, `<6>` info, `<7>` debug and trace), so `journalctl -p warning` works.
//! - **Syslog** (`TXMAP_LOG_SYSLOG=1`, or a facility name such as `mail`, `daemon`, `local0`):
//!   one RFC 3164 datagram per event to `/dev/log` (`TXMAP_LOG_SYSLOG_SOCKET` overrides the
//!   path), `<PRI>ident[pid]: message`, facility `mail` by default as Postfix's own logs, with
//!   `warning: `/`error: ` before the message as Postfix writes them. The syslog daemon adds
//!   the time of reception and the host name. A line that cannot be sent (no syslog daemon)
//!   goes to stderr instead, with its priority prefix, so nothing is lost.
//!
//! `JOURNAL_STREAM` is honoured only when it names stderr's own device and inode, as
//! sd-daemon(3) asks: a `txmap` started by a service with stderr redirected to a file keeps
//! plain lines there.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Environment variable that turns syslog output on (`1`, `yes`, `true` or a facility name).
pub const SYSLOG_ENV: &str = "TXMAP_LOG_SYSLOG";
/// Environment variable overriding the syslog socket path (tests).
pub const SYSLOG_SOCKET_ENV: &str = "TXMAP_LOG_SYSLOG_SOCKET";
/// The local syslog socket.
pub const DEFAULT_SYSLOG_SOCKET: &str = "/dev/log";

/// Syslog facility `mail` (RFC 3164 code 2), as Postfix logs.
pub const FACILITY_MAIL: u8 = 2;

/// The output chosen for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Plain lines on stderr, with timestamps.
    Stderr {
        /// ANSI colours.
        ansi: bool,
    },
    /// Lines on stderr read by journald: priority prefix, no timestamp.
    Journal,
    /// RFC 3164 datagrams to a syslog socket.
    Syslog {
        /// Socket path.
        socket: PathBuf,
        /// Facility code (mail = 2).
        facility: u8,
    },
}

/// The syslog severity of a tracing level (sd-daemon(3) prefixes use the same numbers).
pub fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The facility code of a syslog facility name (`mail`, `daemon`, `user`, `local0`..`local7`).
pub fn facility_code(name: &str) -> Option<u8> {
    Some(match name {
        "user" => 1,
        "mail" => FACILITY_MAIL,
        "daemon" => 3,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => return None,
    })
}

/// Decides the output from the environment. An unusable `TXMAP_LOG_SYSLOG` value is returned
/// as a warning to log once logging works.
pub fn choose(
    syslog: Option<&str>,
    syslog_socket: Option<PathBuf>,
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
    terminal: bool,
    no_color: bool,
) -> (Target, Option<String>) {
    let mut warning = None;
    if let Some(v) = syslog.map(str::trim).filter(|v| !v.is_empty()) {
        let facility = match v.to_ascii_lowercase().as_str() {
            "0" | "no" | "false" | "off" => None,
            "1" | "yes" | "true" | "on" => Some(FACILITY_MAIL),
            name => match facility_code(name) {
                Some(f) => Some(f),
                None => {
                    warning = Some(format!(
                        "{SYSLOG_ENV}={v}: unknown facility (expected 1, mail, daemon, user or \
                         local0..local7); logging to syslog with facility mail"
                    ));
                    Some(FACILITY_MAIL)
                }
            },
        };
        if let Some(facility) = facility {
            let socket = syslog_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SYSLOG_SOCKET));
            return (Target::Syslog { socket, facility }, warning);
        }
    }
    if let (Some(js), Some((dev, ino))) = (journal_stream, stderr_id) {
        if js.trim() == format!("{dev}:{ino}") {
            return (Target::Journal, warning);
        }
    }
    (
        Target::Stderr {
            ansi: terminal && !no_color,
        },
        warning,
    )
}

/// Device and inode of stderr, as `JOURNAL_STREAM` names them.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = io::stderr().as_fd().try_clone_to_owned().ok()?;
    let m = std::fs::File::from(fd).metadata().ok()?;
    Some((m.dev(), m.ino()))
}

/// The output chosen from this process's environment.
pub fn from_env() -> (Target, Option<String>) {
    let syslog = std::env::var(SYSLOG_ENV).ok();
    let journal = std::env::var(JOURNAL_STREAM).ok();
    choose(
        syslog.as_deref(),
        std::env::var_os(SYSLOG_SOCKET_ENV)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        journal.as_deref(),
        stderr_id(),
        std::io::IsTerminal::is_terminal(&io::stderr()),
        std::env::var_os("NO_COLOR").is_some(),
    )
}

/// The variable systemd sets for services whose stderr goes to the journal.
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// Prefixes every line of `text` with `<severity>`, as journald reads them.
pub fn journal_lines(severity: u8, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for line in text.lines() {
        out.push_str(&format!("<{severity}>{line}\n"));
    }
    out
}

/// One RFC 3164 message for the local syslog socket: `<PRI>ident[pid]: [warning: ]message`,
/// on one line (line breaks become spaces). No timestamp and no host name: the local syslog
/// daemon (rsyslog, journald) stamps the time of reception and its host name.
pub fn syslog_message(facility: u8, level: &Level, ident: &str, pid: u32, text: &str) -> String {
    let sev = severity(level);
    let prefix = match *level {
        Level::ERROR => "error: ",
        Level::WARN => "warning: ",
        _ => "",
    };
    let body: String = text
        .trim_end()
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("<{}>{ident}[{pid}]: {prefix}{body}", facility * 8 + sev)
}

/// A `MakeWriter` for the journal and syslog targets: each event is formatted into a buffer
/// that is written (journal) or sent (syslog) whole when the writer is dropped.
#[derive(Clone, Debug)]
pub struct Sink {
    kind: SinkKind,
}

#[derive(Clone, Debug)]
enum SinkKind {
    Journal,
    Syslog(Arc<SyslogSocket>),
}

#[derive(Debug)]
struct SyslogSocket {
    path: PathBuf,
    facility: u8,
    ident: String,
    pid: u32,
    sock: Mutex<Option<UnixDatagram>>,
}

impl SyslogSocket {
    /// Sends one message, reconnecting once if the syslog daemon was restarted.
    fn send(&self, msg: &str) -> io::Result<()> {
        let mut guard = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..2 {
            if guard.is_none() {
                let s = UnixDatagram::unbound()?;
                s.connect(&self.path)?;
                *guard = Some(s);
            }
            if let Some(s) = guard.as_ref() {
                match s.send(msg.as_bytes()) {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => *guard = None,
                    Err(e) => return Err(e),
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "syslog socket refused the message",
        ))
    }
}

impl Sink {
    /// For [`Target::Journal`].
    pub fn journal() -> Sink {
        Sink {
            kind: SinkKind::Journal,
        }
    }

    /// For [`Target::Syslog`]; `ident` is the program name (`txmapd`, `txmap`).
    pub fn syslog(path: PathBuf, facility: u8, ident: &str) -> Sink {
        Sink {
            kind: SinkKind::Syslog(Arc::new(SyslogSocket {
                path,
                facility,
                ident: ident.to_string(),
                pid: std::process::id(),
                sock: Mutex::new(None),
            })),
        }
    }
}

/// One event being formatted.
#[derive(Debug)]
pub struct EventWriter {
    kind: SinkKind,
    level: Level,
    buf: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        let sev = severity(&self.level);
        match &self.kind {
            SinkKind::Journal => {
                let _ = io::stderr().write_all(journal_lines(sev, &text).as_bytes());
            }
            SinkKind::Syslog(s) => {
                let msg = syslog_message(s.facility, &self.level, &s.ident, s.pid, &text);
                if s.send(&msg).is_err() {
                    // No syslog daemon: keep the line, on stderr.
                    let _ = io::stderr().write_all(journal_lines(sev, &text).as_bytes());
                }
            }
        }
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        self.writer(Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> EventWriter {
        self.writer(*meta.level())
    }
}

impl Sink {
    fn writer(&self, level: Level) -> EventWriter {
        EventWriter {
            kind: self.kind.clone(),
            level,
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_counts_only_when_it_names_stderr() {
        let t = |js: Option<&str>| choose(None, None, js, Some((64, 1234)), false, false).0;
        assert_eq!(t(Some("64:1234")), Target::Journal);
        assert_eq!(t(Some("64:9999")), Target::Stderr { ansi: false });
        assert_eq!(t(Some("garbage")), Target::Stderr { ansi: false });
        assert_eq!(t(None), Target::Stderr { ansi: false });
    }

    #[test]
    fn syslog_wins_and_defaults_to_facility_mail_on_dev_log() {
        let (t, w) = choose(
            Some("1"),
            None,
            Some("64:1234"),
            Some((64, 1234)),
            true,
            false,
        );
        assert_eq!(
            t,
            Target::Syslog {
                socket: PathBuf::from("/dev/log"),
                facility: FACILITY_MAIL
            }
        );
        assert!(w.is_none());
        let (t, _) = choose(Some("local3"), Some("/x".into()), None, None, false, false);
        assert_eq!(
            t,
            Target::Syslog {
                socket: PathBuf::from("/x"),
                facility: 19
            }
        );
        let (t, w) = choose(Some("mial"), None, None, None, false, false);
        assert!(matches!(t, Target::Syslog { facility: 2, .. }));
        assert!(w.is_some_and(|w| w.contains("mial")));
        let (t, _) = choose(Some("0"), None, None, None, true, false);
        assert_eq!(t, Target::Stderr { ansi: true });
        let (t, _) = choose(None, None, None, None, true, true);
        assert_eq!(t, Target::Stderr { ansi: false });
    }

    #[test]
    fn messages_carry_the_priority_as_postfix_logs_do() {
        assert_eq!(
            syslog_message(FACILITY_MAIL, &Level::WARN, "txmapd", 42, "a\nb\n"),
            "<20>txmapd[42]: warning: a b"
        );
        assert_eq!(
            syslog_message(FACILITY_MAIL, &Level::INFO, "txmapd", 42, "ready\n"),
            "<22>txmapd[42]: ready"
        );
        assert_eq!(journal_lines(3, "x\ny\n"), "<3>x\n<3>y\n");
    }

    #[test]
    fn a_syslog_sink_sends_one_datagram_per_event() {
        let dir = std::env::temp_dir().join(format!("txmap-syslog-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("log");
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let sink = Sink::syslog(path, FACILITY_MAIL, "txmap");
        {
            let mut w = sink.writer(Level::ERROR);
            w.write_all(b"part one, ").expect("write");
            w.write_all(b"part two\n").expect("write");
        }
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("datagram");
        let got = String::from_utf8_lossy(&buf[..n]);
        assert_eq!(
            got,
            format!(
                "<19>txmap[{}]: error: part one, part two",
                std::process::id()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
