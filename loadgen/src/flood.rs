//! `lb-loadgen syn-flood`: TCP SYNs from spoofed IPv4 sources, for the conntrack's flood
//! scenario (a bench or test namespace only: the sources are made up, the count and the
//! time are bounded). Each SYN comes from its own source address and port, drawn from
//! `--sources`, as a SYN flood's do, so every one looks like a new flow.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

/// What was sent.
#[derive(Debug, Serialize)]
pub struct FloodSummary {
    pub sent: u64,
    pub errors: u64,
    pub elapsed_s: f64,
}

/// Sends up to `count` SYNs to `target` within `duration`, from sources in `base/prefix`.
///
/// # Errors
/// When the raw socket cannot be opened (it needs `CAP_NET_RAW`), or the range is empty.
pub fn run(
    target: SocketAddrV4,
    sources: (Ipv4Addr, u8),
    count: u64,
    duration: Duration,
) -> Result<FloodSummary> {
    let (base, prefix) = sources;
    if prefix == 0 || prefix > 32 {
        bail!("--sources: a prefix length of 1 to 32 is needed");
    }
    let host_bits = 32 - u32::from(prefix);
    let base = u32::from(base) & !(((1u64 << host_bits) - 1) as u32);
    // SAFETY: a plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a raw socket (CAP_NET_RAW)");
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let dest = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let start = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    while sent + errors < count && start.elapsed() < duration {
        let r = rng.next();
        let host = if host_bits == 0 {
            0
        } else {
            (r as u32) & (((1u64 << host_bits) - 1) as u32)
        };
        let source = Ipv4Addr::from(base | host);
        let sport = 1024 + ((r >> 32) as u16 % 64_000);
        let packet = syn(source, sport, *target.ip(), target.port(), (r >> 48) as u32);
        // SAFETY: `packet` and `dest` outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const dest).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            errors += 1;
        } else {
            sent += 1;
        }
    }
    Ok(FloodSummary {
        sent,
        errors,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// An IPv4 packet with a TCP SYN, checksums filled in.
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // version 4, 20-byte header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // 20-byte header
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes()); // window
    // The pseudo-header: addresses, protocol, TCP length.
    let mut pseudo = 0u32;
    for chunk in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    pseudo += 6 + 20;
    let tcp_sum = checksum(tcp, pseudo);
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// The Internet checksum of `data`, starting from the partial sum `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A small PRNG: sources and ports only need to differ, not to be unpredictable.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let p = syn(
            Ipv4Addr::new(192, 168, 7, 9),
            4242,
            Ipv4Addr::new(192, 168, 50, 1),
            30080,
            7,
        );
        // A header with its checksum in place sums to zero.
        assert_eq!(checksum(&p[..20], 0), 0);
        let mut pseudo = 0u32;
        for chunk in p[12..20].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        }
        assert_eq!(checksum(&p[20..], pseudo + 6 + 20), 0);
        assert_eq!(p[33], 0x02, "SYN only");
    }
}
