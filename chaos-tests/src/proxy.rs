//! A UDP fault proxy between txmap nodes, for the chaos tests.
//!
//! One [`Proxy`] forwards datagrams from its listening port on 127.0.0.1 to one target
//! (a `txmapd`), and the answers back. Each client (source address) gets its own upstream
//! socket, so the target's replies are routed to the client that sent the request: QUIC
//! connections from many `txmap` processes and peer daemons can share one proxy.
//!
//! Faults are set at run time with [`Proxy::set`] and apply to both directions:
//! drop (percent), delay (ms, plus uniform jitter), duplicate (percent), reorder (percent of
//! datagrams held back by an extra 5–40 ms so that later ones overtake them), and partition
//! (drop everything) / heal. QUIC copes with loss, duplication and reordering itself, so the
//! proxy never needs to understand the packets.
//!
//! Every proxy has its own [`SplitMix64`] seeded from the run's seed: the sequence of fault
//! draws is fixed by the seed. Which datagram meets which draw depends on the timing of the
//! real processes, so a run's packet-level fate is not replayable, only its fault settings.
//! Only loopback addresses are accepted.

use crate::rng::SplitMix64;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;

/// Fault settings of one proxy (both directions).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Percent of datagrams dropped.
    pub drop_pct: f64,
    /// Delay added to every datagram, in ms.
    pub delay_ms: u64,
    /// Extra uniform jitter `0..=jitter_ms` added to the delay.
    pub jitter_ms: u64,
    /// Percent of datagrams sent twice (the copy with its own delay).
    pub dup_pct: f64,
    /// Percent of datagrams held back 5–40 ms more, so later ones overtake them.
    pub reorder_pct: f64,
    /// Drop everything (a network partition) until healed.
    pub partitioned: bool,
}

impl Faults {
    /// No fault at all.
    pub fn clean() -> Faults {
        Faults::default()
    }

    /// True when nothing is injected.
    pub fn is_clean(&self) -> bool {
        *self == Faults::default()
    }
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.partitioned {
            return f.write_str("partitioned");
        }
        if self.is_clean() {
            return f.write_str("clean");
        }
        let mut parts = Vec::new();
        if self.drop_pct > 0.0 {
            parts.push(format!("drop {}%", self.drop_pct));
        }
        if self.delay_ms > 0 || self.jitter_ms > 0 {
            parts.push(format!("delay {}±{} ms", self.delay_ms, self.jitter_ms));
        }
        if self.dup_pct > 0.0 {
            parts.push(format!("dup {}%", self.dup_pct));
        }
        if self.reorder_pct > 0.0 {
            parts.push(format!("reorder {}%", self.reorder_pct));
        }
        f.write_str(&parts.join(", "))
    }
}

/// Datagram counters of one proxy.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received from either side.
    pub received: AtomicU64,
    /// Datagrams sent on (copies included).
    pub forwarded: AtomicU64,
    /// Dropped by `drop_pct`.
    pub dropped: AtomicU64,
    /// Dropped because of a partition.
    pub partitioned: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Delayed (delay or jitter above 0).
    pub delayed: AtomicU64,
    /// Held back to be overtaken.
    pub reordered: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams received from either side.
    pub received: u64,
    /// Datagrams sent on (copies included).
    pub forwarded: u64,
    /// Dropped by `drop_pct`.
    pub dropped: u64,
    /// Dropped because of a partition.
    pub partitioned: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Delayed.
    pub delayed: u64,
    /// Held back to be overtaken.
    pub reordered: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.received += o.received;
        self.forwarded += o.forwarded;
        self.dropped += o.dropped;
        self.partitioned += o.partitioned;
        self.duplicated += o.duplicated;
        self.delayed += o.delayed;
        self.reordered += o.reordered;
    }
}

#[derive(Debug)]
struct Shared {
    faults: Mutex<Faults>,
    rng: Mutex<SplitMix64>,
    counters: Counters,
}

impl Shared {
    /// The send delays of one datagram: empty = dropped; two entries = duplicated.
    fn plan(&self) -> Vec<Duration> {
        let f = self.faults.lock().map(|f| *f).unwrap_or_default();
        let c = &self.counters;
        c.received.fetch_add(1, Ordering::Relaxed);
        if f.partitioned {
            c.partitioned.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        if f.is_clean() {
            return vec![Duration::ZERO];
        }
        let Ok(mut rng) = self.rng.lock() else {
            return vec![Duration::ZERO];
        };
        if rng.chance(f.drop_pct) {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let copies = if rng.chance(f.dup_pct) {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let mut out = Vec::new();
        for _ in 0..copies {
            let mut ms = f.delay_ms + rng.range(0, f.jitter_ms);
            if rng.chance(f.reorder_pct) {
                c.reordered.fetch_add(1, Ordering::Relaxed);
                ms += rng.range(5, 40);
            }
            if ms > 0 {
                c.delayed.fetch_add(1, Ordering::Relaxed);
            }
            out.push(Duration::from_millis(ms));
        }
        out
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            received: g(&c.received),
            forwarded: g(&c.forwarded),
            dropped: g(&c.dropped),
            partitioned: g(&c.partitioned),
            duplicated: g(&c.duplicated),
            delayed: g(&c.delayed),
            reordered: g(&c.reordered),
        }
    }
}

/// Sends `data` to `to` through `sock` after each delay of `plan` (now when zero).
fn dispatch(shared: &Arc<Shared>, sock: &Arc<UdpSocket>, to: Option<SocketAddr>, data: &[u8]) {
    for d in shared.plan() {
        let send = {
            let sock = sock.clone();
            let shared = shared.clone();
            let data = data.to_vec();
            async move {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                let r = match to {
                    Some(a) => sock.send_to(&data, a).await,
                    None => sock.send(&data).await,
                };
                if r.is_ok() {
                    shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        tokio::spawn(send);
    }
}

/// One forwarding port.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients send (127.0.0.1:port).
    pub listen: SocketAddr,
    /// Where datagrams go.
    pub target: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Replaces the fault settings.
    pub fn set(&self, f: Faults) {
        if let Ok(mut g) = self.shared.faults.lock() {
            *g = f;
        }
    }

    /// The current fault settings.
    pub fn faults(&self) -> Faults {
        self.shared.faults.lock().map(|f| *f).unwrap_or_default()
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a client flow may stay silent before its upstream socket is closed.
const FLOW_IDLE: Duration = Duration::from_secs(120);

async fn serve(listener: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shared>) {
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = listener.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let existing = flows.lock().ok().and_then(|m| m.get(&client).cloned());
        let up = match existing {
            Some(u) => u,
            None => {
                let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if u.connect(target).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                if let Ok(mut m) = flows.lock() {
                    m.insert(client, u.clone());
                }
                // Target → client.
                let (u2, l2, s2, f2) = (u.clone(), listener.clone(), shared.clone(), flows.clone());
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65536];
                    loop {
                        match tokio::time::timeout(FLOW_IDLE, u2.recv(&mut b)).await {
                            Ok(Ok(n)) => dispatch(&s2, &l2, Some(client), &b[..n]),
                            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                            Err(_) => break,
                        }
                    }
                    if let Ok(mut m) = f2.lock() {
                        m.remove(&client);
                    }
                });
                u
            }
        };
        // Client → target.
        dispatch(&shared, &up, None, &buf[..n]);
    }
}

/// The proxies of one cluster, on their own small tokio runtime.
#[derive(Debug)]
pub struct ProxySet {
    rt: tokio::runtime::Runtime,
    proxies: Vec<((usize, usize), Proxy)>,
}

impl ProxySet {
    /// A set with no proxy yet.
    pub fn new() -> Result<ProxySet> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chaos-proxy")
            .enable_all()
            .build()
            .context("proxy runtime")?;
        Ok(ProxySet {
            rt,
            proxies: Vec::new(),
        })
    }

    /// Adds a proxy for the link `from → to` (node numbers, 1-based) forwarding to `target`,
    /// listening on `127.0.0.1:port` (0: any free port). `seed` fixes its fault draws.
    pub fn add(
        &mut self,
        from: usize,
        to: usize,
        port: u16,
        target: SocketAddr,
        seed: u64,
    ) -> Result<SocketAddr> {
        if !target.ip().is_loopback() {
            bail!("the fault proxy only forwards to loopback addresses, not {target}");
        }
        let listener = self.rt.block_on(UdpSocket::bind(("127.0.0.1", port)))?;
        let listen = listener.local_addr()?;
        let stream = ((from as u64) << 32) | to as u64;
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::clean()),
            rng: Mutex::new(SplitMix64::derive(seed, stream)),
            counters: Counters::default(),
        });
        let task = self
            .rt
            .spawn(serve(Arc::new(listener), target, shared.clone()));
        self.proxies.push((
            (from, to),
            Proxy {
                listen,
                target,
                shared,
                task,
            },
        ));
        Ok(listen)
    }

    /// The proxy of link `from → to`.
    pub fn get(&self, from: usize, to: usize) -> Option<&Proxy> {
        self.proxies
            .iter()
            .find(|(k, _)| *k == (from, to))
            .map(|(_, p)| p)
    }

    /// Every link, as `(from, to)`.
    pub fn links(&self) -> Vec<(usize, usize)> {
        self.proxies.iter().map(|(k, _)| *k).collect()
    }

    /// Sets the faults of every link.
    pub fn set_all(&self, f: Faults) {
        for (_, p) in &self.proxies {
            p.set(f);
        }
    }

    /// Sets the faults of every link to or from `node`.
    pub fn set_node(&self, node: usize, f: Faults) {
        for ((a, b), p) in &self.proxies {
            if *a == node || *b == node {
                p.set(f);
            }
        }
    }

    /// Cuts `node` off from every other node (both directions).
    pub fn partition(&self, node: usize) {
        for ((a, b), p) in &self.proxies {
            if *a == node || *b == node {
                let mut f = p.faults();
                f.partitioned = true;
                p.set(f);
            }
        }
    }

    /// Ends every partition, keeping the other fault settings.
    pub fn heal(&self) {
        for (_, p) in &self.proxies {
            let mut f = p.faults();
            f.partitioned = false;
            p.set(f);
        }
    }

    /// Sum of every proxy's counters.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for (_, p) in &self.proxies {
            s += p.stats();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdp;

    fn echo_server() -> (SocketAddr, std::thread::JoinHandle<()>) {
        let s = StdUdp::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut b) {
                if &b[..n] == b"quit" {
                    break;
                }
                let _ = s.send_to(&b[..n], from);
            }
        });
        (addr, h)
    }

    fn roundtrips(proxy: SocketAddr, n: usize) -> usize {
        let c = StdUdp::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = 0;
        for i in 0..n {
            c.send_to(format!("ping{i}").as_bytes(), proxy).unwrap();
        }
        let mut b = [0u8; 1500];
        while c.recv_from(&mut b).is_ok() {
            got += 1;
        }
        got
    }

    #[test]
    fn forwards_both_ways_and_injects_faults() {
        let (echo, h) = echo_server();
        let mut set = ProxySet::new().unwrap();
        let p = set.add(1, 2, 0, echo, 42).unwrap();
        assert_eq!(roundtrips(p, 20), 20, "clean proxy must forward everything");

        set.partition(2);
        assert_eq!(roundtrips(p, 10), 0, "a partition drops everything");
        set.heal();
        assert_eq!(roundtrips(p, 10), 10, "healed");

        set.set_all(Faults {
            dup_pct: 100.0,
            ..Faults::clean()
        });
        assert_eq!(roundtrips(p, 10), 40, "duplicated in both directions");

        set.set_all(Faults {
            drop_pct: 50.0,
            delay_ms: 5,
            jitter_ms: 5,
            reorder_pct: 30.0,
            ..Faults::clean()
        });
        let got = roundtrips(p, 200);
        assert!(
            (20..120).contains(&got),
            "about a quarter survive two 50% drops: {got}"
        );
        let s = set.stats();
        assert!(s.dropped > 0 && s.partitioned >= 10 && s.duplicated >= 20 && s.reordered > 0);
        let c = StdUdp::bind("127.0.0.1:0").unwrap();
        set.set_all(Faults::clean());
        c.send_to(b"quit", p).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn refuses_non_loopback_targets() {
        let mut set = ProxySet::new().unwrap();
        assert!(set.add(1, 2, 0, "192.0.2.1:9".parse().unwrap(), 1).is_err());
    }
}
