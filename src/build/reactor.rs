//! The event loop's core: one `mio::Poll`, one deadline heap and the process signals, shared
//! by every owner (the build worker, later the CI daemon). It tags tokens and timers with
//! their owner and hands back what happened; it knows nothing of goals, children or builds.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Registry, Token};
use signal_hook_mio::v1_0::Signals;

/// Who a token or timer belongs to; the driver routes wake-ups by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    Signals,
    Worker,
    Ci,
}

/// One thing that happened during [`Reactor::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A registered source is ready.
    Io { token: Token, owner: Owner },
    /// A timer's deadline passed. Owners ignore keys they no longer care about.
    Timer { owner: Owner, key: u64 },
    /// A signal arrived (SIGCHLD, SIGINT, ...).
    Signal(i32),
}

#[derive(Debug)]
pub enum ReactorError {
    Io { op: &'static str, err: io::Error },
}

impl fmt::Display for ReactorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReactorError::Io { op, err } => write!(f, "{op}: {err}"),
        }
    }
}

impl std::error::Error for ReactorError {}

fn rerr(op: &'static str) -> impl FnOnce(io::Error) -> ReactorError {
    move |err| ReactorError::Io { op, err }
}

/// The signals a command-line driver wants as loop events.
pub const DRIVER_SIGNALS: [i32; 4] = [libc::SIGCHLD, libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

const SIGNAL_TOKEN: Token = Token(0);

pub struct Reactor {
    poll: Poll,
    events: Events,
    /// Min-heap of (deadline, sequence, owner, key); the sequence keeps equal deadlines FIFO.
    timers: BinaryHeap<Reverse<(Instant, u64, Owner, u64)>>,
    seq: u64,
    next_token: usize,
    owners: Vec<Owner>,
    signals: Signals,
}

impl Reactor {
    /// A reactor delivering `signals` as [`Wake::Signal`]. Registering a signal replaces its
    /// default action (SIGINT no longer kills the process), so tests pass only SIGCHLD.
    pub fn new(signals: &[i32]) -> Result<Reactor, ReactorError> {
        let poll = Poll::new().map_err(rerr("create poll"))?;
        let mut sigs = Signals::new(signals).map_err(rerr("register signals"))?;
        poll.registry()
            .register(&mut sigs, SIGNAL_TOKEN, Interest::READABLE)
            .map_err(rerr("register signals"))?;
        Ok(Reactor {
            poll,
            events: Events::with_capacity(256),
            timers: BinaryHeap::new(),
            seq: 0,
            next_token: 1,
            owners: vec![Owner::Signals],
            signals: sigs,
        })
    }

    /// A fresh token for `owner`. Tokens are never reused.
    pub fn alloc_token(&mut self, owner: Owner) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        self.owners.push(owner);
        t
    }

    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// Wakes `owner` with `key` at `at` (or the first wait after it). There is no
    /// cancellation: owners ignore keys that are stale.
    pub fn add_timer(&mut self, at: Instant, owner: Owner, key: u64) {
        self.seq += 1;
        self.timers.push(Reverse((at, self.seq, owner, key)));
    }

    /// The nearest deadline, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, ..))| *at)
    }

    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Waits for I/O, a signal or the nearest deadline (not at all when `block` is false)
    /// and appends what happened to `out`: I/O and signals first, then due timers.
    pub fn wait(&mut self, out: &mut Vec<Wake>, block: bool) -> Result<(), ReactorError> {
        let timeout = if !block {
            Some(Duration::ZERO)
        } else {
            self.next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()))
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(rerr("wait for events")(e)),
        }
        let mut signalled = false;
        for ev in self.events.iter() {
            let token = ev.token();
            if token == SIGNAL_TOKEN {
                signalled = true;
                continue;
            }
            let owner = self.owners.get(token.0).copied().unwrap_or(Owner::Signals);
            out.push(Wake::Io { token, owner });
        }
        if signalled {
            for s in self.signals.pending() {
                out.push(Wake::Signal(s));
            }
        }
        let now = Instant::now();
        while let Some(Reverse((at, _, owner, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            out.push(Wake::Timer { owner, key });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_deadline_order_and_wait_sleeps_until_the_first() {
        let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
        let t0 = Instant::now();
        r.add_timer(t0 + Duration::from_millis(60), Owner::Worker, 2);
        r.add_timer(t0 + Duration::from_millis(30), Owner::Ci, 1);
        r.add_timer(t0 + Duration::from_millis(30), Owner::Worker, 3);
        let mut out = Vec::new();
        r.wait(&mut out, false).unwrap();
        assert!(out.is_empty());
        // Other tests' children send SIGCHLD to this process too: keep timers only.
        let timers_only = |r: &mut Reactor, out: &mut Vec<Wake>, n: usize| {
            while out.len() < n {
                r.wait(out, true).unwrap();
                out.retain(|w| matches!(w, Wake::Timer { .. }));
            }
        };
        timers_only(&mut r, &mut out, 2);
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(
            out,
            vec![
                Wake::Timer {
                    owner: Owner::Ci,
                    key: 1
                },
                Wake::Timer {
                    owner: Owner::Worker,
                    key: 3
                }
            ]
        );
        out.clear();
        timers_only(&mut r, &mut out, 1);
        assert!(t0.elapsed() >= Duration::from_millis(60));
        assert_eq!(
            out,
            vec![Wake::Timer {
                owner: Owner::Worker,
                key: 2
            }]
        );
        assert_eq!(r.pending_timers(), 0);
    }

    #[test]
    fn io_events_carry_their_owner() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let t = r.alloc_token(Owner::Ci);
        r.registry()
            .register(
                &mut mio::unix::SourceFd(&a.as_raw_fd()),
                t,
                Interest::READABLE,
            )
            .unwrap();
        b.write_all(b"x").unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            r.wait(&mut out, true).unwrap();
            out.retain(|w| !matches!(w, Wake::Signal(_)));
        }
        assert_eq!(
            out,
            vec![Wake::Io {
                token: t,
                owner: Owner::Ci
            }]
        );
    }
}
