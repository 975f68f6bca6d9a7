//! Readiness for systemd (`Type=notify`): the `sd_notify` protocol, without libsystemd.
//!
//! systemd passes the path of a Unix datagram socket in `$NOTIFY_SOCKET`; the service sends
//! newline-separated `KEY=VALUE` assignments to it, one datagram per message. A name starting
//! with `@` is in the abstract namespace (the `@` stands for the leading NUL byte). txmapd sends
//! `READY=1` once it listens and has recovered its journal (so `systemctl start` returns only
//! then, and units ordered after it find it serving), `RELOADING=1` … `READY=1` around a reload,
//! and `STOPPING=1` when it shuts down.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, or `Type=simple`) nothing is sent. A failure to
//! send is returned to the caller, who only logs it: readiness is a courtesy to the service
//! manager, never a reason for txmapd to stop serving.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub(crate) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` to `$NOTIFY_SOCKET`. `Ok(false)` when the variable is unset or empty.
pub(crate) fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(s) if !s.is_empty() => notify_to(&s, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` as one datagram to the socket named `socket` (a path, or `@name` for the
/// abstract namespace).
pub(crate) fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = address(socket)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::other(format!(
            "short write to the notify socket: {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

fn address(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        Some((b'/', _)) => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "${NOTIFY_SOCKET} is neither an absolute path nor an @abstract name: {}",
                socket.to_string_lossy()
            ),
        )),
    }
}

/// `READY=1`, with a one-line status shown by `systemctl status`.
pub(crate) fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}"));
}

/// `RELOADING=1`: a reload has started; [`ready`] ends it.
pub(crate) fn reloading() {
    send("RELOADING=1\nSTATUS=reloading the configuration");
}

/// `STOPPING=1`: txmapd is shutting down.
pub(crate) fn stopping() {
    send("STOPPING=1\nSTATUS=shutting down");
}

fn send(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, "cannot tell systemd (NOTIFY_SOCKET) about this state change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_path_socket_receives_each_state_as_one_datagram() {
        let dir = std::env::temp_dir().join(format!("txmap-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        for state in ["READY=1\nSTATUS=serving", "RELOADING=1", "STOPPING=1"] {
            notify_to(path.as_os_str(), state).expect("send");
            assert_eq!(receive(&server), state);
        }
        drop(server);
        // Nobody listens any more: an error, not a panic and not a silent success.
        assert!(notify_to(path.as_os_str(), "READY=1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_abstract_socket_is_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("txmap-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        notify_to(OsStr::new(&format!("@{name}")), "READY=1").expect("send");
        assert_eq!(receive(&server), "READY=1");
    }

    #[test]
    fn a_relative_or_empty_socket_name_is_refused() {
        assert!(notify_to(OsStr::new("relative/notify"), "READY=1").is_err());
        assert!(notify_to(OsStr::new(""), "READY=1").is_err());
    }
}
