//! `lb-loadgen run`: `--workers` threads, each doing one operation after the other until the
//! deadline or the shared operation count is reached. Every operation has its own timeout, so a
//! run never lasts much longer than `--duration-ms` plus one timeout.
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, ensure};

use crate::summary::{Summary, WorkerResult};
use crate::{RunArgs, Workload};

/// At most this many latency samples per worker (a few MB).
const MAX_SAMPLES: usize = 1 << 20;

pub fn run(args: &RunArgs) -> Result<Summary> {
    ensure!(args.workers > 0, "--workers must be at least 1");
    let issued = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_millis(args.duration_ms);
    let results: Vec<WorkerResult> = thread::scope(|scope| {
        let handles: Vec<_> = (0..args.workers)
            .map(|index| {
                let issued = &issued;
                scope.spawn(move || Worker::new(args, index, issued, deadline).run())
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|_| WorkerResult::panicked()))
            .collect()
    });
    Ok(Summary::new(args, started.elapsed(), results))
}

/// One thread's state: its random generator, its socket (kept workloads) and its counts.
struct Worker<'a> {
    args: &'a RunArgs,
    issued: &'a AtomicU64,
    deadline: Instant,
    rng: XorShift,
    seq: u64,
    request: Vec<u8>,
    answer: Vec<u8>,
    tcp: Option<TcpStream>,
    udp: Option<(UdpSocket, SocketAddr)>,
    result: WorkerResult,
}

impl<'a> Worker<'a> {
    fn new(args: &'a RunArgs, index: usize, issued: &'a AtomicU64, deadline: Instant) -> Self {
        let size = usize::from(args.size);
        Self {
            args,
            issued,
            deadline,
            rng: XorShift::seeded(index),
            seq: 0,
            request: vec![b'x'; size],
            answer: vec![0; size],
            tcp: None,
            udp: None,
            result: WorkerResult::default(),
        }
    }

    fn run(mut self) -> WorkerResult {
        while Instant::now() < self.deadline
            && self.issued.fetch_add(1, Ordering::Relaxed) < self.args.count
        {
            self.seq += 1;
            self.request[..8].copy_from_slice(&self.seq.to_be_bytes());
            let began = Instant::now();
            let outcome = match self.args.workload {
                Workload::TcpCrr => self.tcp_crr(),
                Workload::TcpRr => self.tcp_rr(),
                Workload::UdpUnconnected | Workload::UdpConnected => self.udp(),
            };
            match outcome {
                Ok(()) => self.result.record(began.elapsed(), MAX_SAMPLES),
                Err(error) => {
                    self.result.error(&error);
                    // A kept socket that failed is replaced by the next operation.
                    self.tcp = None;
                    self.udp = None;
                }
            }
        }
        self.result
    }

    fn pick(&mut self) -> SocketAddr {
        let targets = &self.args.targets;
        let at = usize::try_from(self.rng.next() % targets.len() as u64).unwrap_or(0);
        targets[at]
    }

    /// connect, request, answer, close: the cost of a new connection through the balancer.
    fn tcp_crr(&mut self) -> io::Result<()> {
        let target = self.pick();
        let mut stream = TcpStream::connect_timeout(&target, self.args.timeout())?;
        self.exchange_tcp(&mut stream)
    }

    /// Request and answer on the worker's kept connection.
    fn tcp_rr(&mut self) -> io::Result<()> {
        let mut stream = match self.tcp.take() {
            Some(stream) => stream,
            None => {
                let target = self.pick();
                let stream = TcpStream::connect_timeout(&target, self.args.timeout())?;
                stream.set_nodelay(true)?;
                stream
            }
        };
        self.exchange_tcp(&mut stream)?;
        self.tcp = Some(stream);
        Ok(())
    }

    fn exchange_tcp(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        stream.set_read_timeout(Some(self.args.timeout()))?;
        stream.write_all(&self.request)?;
        stream.read_exact(&mut self.answer)?;
        if self.answer != self.request {
            return Err(io::Error::other("the echo differs from the request"));
        }
        Ok(())
    }

    /// One datagram and its echo, on the worker's kept socket (connected or not).
    fn udp(&mut self) -> io::Result<()> {
        let (socket, target) = match self.udp.take() {
            Some(kept) => kept,
            None => {
                let target = self.pick();
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                socket.set_read_timeout(Some(self.args.timeout()))?;
                if self.args.workload == Workload::UdpConnected {
                    socket.connect(target)?;
                }
                (socket, target)
            }
        };
        let connected = self.args.workload == Workload::UdpConnected;
        if connected {
            socket.send(&self.request)?;
        } else {
            socket.send_to(&self.request, target)?;
        }
        // Skip late echoes of earlier (timed-out) requests: only this sequence number counts.
        let until = Instant::now() + self.args.timeout();
        loop {
            let (n, from) = if connected {
                (socket.recv(&mut self.answer)?, target)
            } else {
                socket.recv_from(&mut self.answer)?
            };
            if n == self.request.len() && self.answer == self.request {
                if from != target {
                    // The reply must look as if it came from where we sent (reverse NAT).
                    self.result.foreign_replies += 1;
                }
                break;
            }
            if Instant::now() > until {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no matching echo"));
            }
        }
        self.udp = Some((socket, target));
        Ok(())
    }
}

/// Marsaglia's xorshift64: enough to spread connections over targets.
struct XorShift(u64);

impl XorShift {
    fn seeded(index: usize) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = (nanos as u64) ^ ((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_spreads_over_small_ranges() {
        let mut rng = XorShift::seeded(3);
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            hits[usize::try_from(rng.next() % 10).unwrap()] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
    }
}
