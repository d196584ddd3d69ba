//! Packet parsing and rewriting for the per-packet datapath (IPv4 and IPv6 over Ethernet), at
//! tc and at XDP alike: the hooks differ only in how they reach the packet, which [`Frame`]
//! hides. Headers are read straight from the packet's linear data (one bounds check, no
//! helper call: every packet of the device runs this), or through `bpf_skb_load_bytes` when
//! they are not all in the linear part. Writes and the IPv4 header checksum are direct too
//! when the bytes are linear (at tc, `bpf_skb_store_bytes` and `bpf_l3_csum_replace`
//! otherwise); at tc the L4 checksum always goes through `bpf_l4_csum_replace`, the one
//! that knows a locally sent packet's partial checksum (`CHECKSUM_PARTIAL`) from a
//! complete one. Checksums are fixed incrementally, with the L4 checksum's own offset
//! (never a port's offset) and the pseudo-header flag for addresses.
//!
//! Addresses are held as four network-order words whatever the family, IPv4 ones
//! IPv4-mapped, as the conntrack map keys them.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{PROTO_TCP, PROTO_UDP, to_v4_mapped};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const IP6_SRC_OFF: usize = ETH_HLEN + 8;
const IP6_DST_OFF: usize = ETH_HLEN + 24;
const IP6_HLEN: usize = 40;
/// The More Fragments flag and the fragment offset of `frag_off` (host order).
const IP_MF_OFFSET: u16 = 0x3fff;

/// An error of a helper that rewrote part of a packet: the packet must not go on.
pub struct RewriteError;

/// How a hook reaches its packet: tc's socket buffer, or XDP's frame (`xdp.rs`). The
/// translation is written once over this; the helpers' flags keep tc's meaning.
pub trait Frame: EbpfContext {
    /// Whether the hook forwards SNATed packets itself: their source becomes a node
    /// address, which the kernel's input path would drop as a martian, so tc redirects them
    /// to their next hop. XDP leaves them to tc (see `xdp.rs`).
    const SNAT: bool;
    /// Whether the hook answers a packet for a Service without endpoints with an ICMP
    /// reject itself (a new packet: tc only).
    const REJECT: bool;
    /// The monitor's `MON_HOOK_*` for a flow from outside the node started here.
    const OUTSIDE_HOOK: u8;
    /// Start and end of the packet's directly readable (linear) data.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whether some of the packet lies beyond [`Frame::data_end`].
    fn beyond_linear(&self) -> bool;
    /// The `T` at `off` bytes into the packet, read through a helper.
    fn load<T: Copy>(&self, off: usize) -> Option<T>;
    /// Writes `value` at `off` bytes into the packet.
    fn store<T>(&self, off: usize, value: &T) -> Result<(), RewriteError>;
    /// `bpf_l3_csum_replace`: the checksum at `off` for `from` becoming `to` (`size` 2 or 4
    /// bytes).
    fn l3_csum_replace(
        &self,
        off: usize,
        from: u64,
        to: u64,
        size: u64,
    ) -> Result<(), RewriteError>;
    /// `bpf_l4_csum_replace`: as [`Frame::l3_csum_replace`], `flags` holding the size (0:
    /// `to` is a `bpf_csum_diff` result), `BPF_F_PSEUDO_HDR` and `BPF_F_MARK_MANGLED_0`.
    fn l4_csum_replace(
        &self,
        off: usize,
        from: u64,
        to: u64,
        flags: u64,
    ) -> Result<(), RewriteError>;
    /// The device the packet arrived on.
    fn ifindex(&self) -> u32;
    /// Sends the (translated) packet to its next hop; the hook's action. Asked only when
    /// [`Frame::SNAT`].
    fn redirect(&self, packet: &Packet) -> Result<i32, RewriteError>;
}

impl Frame for TcContext {
    const SNAT: bool = true;
    const REJECT: bool = true;
    const OUTSIDE_HOOK: u8 = lb_common::MON_HOOK_TC_EXTERNAL;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn beyond_linear(&self) -> bool {
        TcContext::data(self) + self.len() as usize > TcContext::data_end(self)
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        TcContext::load(self, off).ok()
    }

    /// A direct write when the bytes are linear (the verifier then unclones a cloned
    /// packet once, before the program runs), else `bpf_skb_store_bytes`.
    #[inline(always)]
    fn store<T>(&self, off: usize, value: &T) -> Result<(), RewriteError> {
        if let Some(at) = direct::<T, _>(self, off) {
            write_at(at, value);
            return Ok(());
        }
        TcContext::store(self, off, value, 0).map_err(|_| RewriteError)
    }

    /// In the program when the checksum is linear: an IPv4 header checksum is always
    /// complete, and the header's sum stays the same, so `skb->csum` needs no fixing.
    #[inline(always)]
    fn l3_csum_replace(
        &self,
        off: usize,
        from: u64,
        to: u64,
        size: u64,
    ) -> Result<(), RewriteError> {
        if direct::<u16, _>(self, off).is_some() {
            return csum_replace(self, off, from, to, size);
        }
        TcContext::l3_csum_replace(self, off, from, to, size).map_err(|_| RewriteError)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &self,
        off: usize,
        from: u64,
        to: u64,
        flags: u64,
    ) -> Result<(), RewriteError> {
        TcContext::l4_csum_replace(self, off, from, to, flags).map_err(|_| RewriteError)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the skb context is valid for the run of the program.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn redirect(&self, packet: &Packet) -> Result<i32, RewriteError> {
        crate::fib::redirect(self, packet)
    }
}

/// The `T` at `off` bytes into the packet data starting at `data`.
///
/// # Safety
/// `data + off + size_of::<T>()` must not pass the packet's `data_end`, checked by the
/// caller where the verifier sees it.
#[inline(always)]
unsafe fn read_at<T: Copy>(data: usize, off: usize) -> T {
    // SAFETY: in bounds by the caller's check; packet headers are not aligned.
    unsafe { core::ptr::read_unaligned((data + off) as *const T) }
}

/// The 5-tuple of a TCP or UDP packet and where its L4 header is.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Addresses as four network-order words (IPv4: IPv4-mapped).
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Ports in network byte order, as in the packet.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// An IPv6 packet.
    pub v6: bool,
    l4_off: usize,
}

/// Whether two four-word addresses are equal, word by word (a slice comparison would
/// become a `bcmp` call, which BPF does not have).
#[inline(always)]
pub fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// TCP header flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Packet {
    /// Parses a TCP or UDP packet over IPv4 or IPv6; `None` for anything else, for IPv4
    /// fragments (a later fragment has no ports: they pass untranslated, as the first
    /// one's flow would need reassembly state this datapath does not keep), and for IPv6
    /// packets with extension headers before TCP/UDP (they pass untranslated too).
    #[inline(always)]
    pub fn parse<C: Frame>(ctx: &C) -> Option<Self> {
        let packet = Self::parse_linear(ctx);
        // Headers may lie beyond the linear data only when there is data beyond it.
        if packet.is_none() && ctx.beyond_linear() {
            return Self::parse_loaded(ctx);
        }
        packet
    }

    /// [`Packet::parse`] from the linear data: `None` also when the headers are not all in
    /// it.
    #[inline(always)]
    fn parse_linear<C: Frame>(ctx: &C) -> Option<Self> {
        let data = ctx.data();
        let end = ctx.data_end();
        // The Ethernet header and a fixed IPv4 header (an IPv6 one is checked below).
        if data + ETH_HLEN + 20 > end {
            return None;
        }
        // SAFETY (every read below): within [data, end), checked before the read.
        let ether_type = u16::from_be(unsafe { read_at::<u16>(data, 12) });
        let (proto, l4_off, saddr, daddr, v6) = match ether_type {
            ETH_P_IP => {
                let version_ihl: u8 = unsafe { read_at(data, ETH_HLEN) };
                let ihl = usize::from(version_ihl & 0x0f);
                if version_ihl >> 4 != 4 || ihl < 5 {
                    return None;
                }
                let frag = u16::from_be(unsafe { read_at::<u16>(data, ETH_HLEN + 6) });
                if frag & IP_MF_OFFSET != 0 {
                    return None;
                }
                (
                    unsafe { read_at::<u8>(data, ETH_HLEN + 9) },
                    ETH_HLEN + ihl * 4,
                    to_v4_mapped(unsafe { read_at(data, IP_SRC_OFF) }),
                    to_v4_mapped(unsafe { read_at(data, IP_DST_OFF) }),
                    false,
                )
            }
            ETH_P_IPV6 => {
                if data + ETH_HLEN + IP6_HLEN > end {
                    return None;
                }
                let version: u8 = unsafe { read_at(data, ETH_HLEN) };
                if version >> 4 != 6 {
                    return None;
                }
                (
                    unsafe { read_at::<u8>(data, ETH_HLEN + 6) },
                    ETH_HLEN + IP6_HLEN,
                    unsafe { read_at(data, IP6_SRC_OFF) },
                    unsafe { read_at(data, IP6_DST_OFF) },
                    true,
                )
            }
            _ => return None,
        };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        // The ports, and the TCP flags 13 bytes into the header: checked and read through
        // one pointer, so the verifier knows each read is within what was checked.
        let l4 = data + l4_off;
        if l4 + 4 > end {
            return None;
        }
        let tcp_flags = if proto == PROTO_TCP {
            if l4 + 14 > end {
                return None;
            }
            unsafe { read_at::<u8>(l4, 13) }
        } else {
            0
        };
        Some(Self {
            saddr,
            daddr,
            sport: unsafe { read_at(l4, 0) },
            dport: unsafe { read_at(l4, 2) },
            proto,
            tcp_flags,
            v6,
            l4_off,
        })
    }

    /// [`Packet::parse`] through `bpf_skb_load_bytes`, for headers beyond the linear data.
    /// (Inlined: as a BPF function its `Option<Packet>` result would put a Rust enum's
    /// union, with its tag at a non-zero offset, into the BTF, which the kernel refuses.)
    #[inline(always)]
    fn parse_loaded<C: Frame>(ctx: &C) -> Option<Self> {
        match u16::from_be(ctx.load::<u16>(12)?) {
            ETH_P_IP => Self::parse4(ctx),
            ETH_P_IPV6 => Self::parse6(ctx),
            _ => None,
        }
    }

    #[inline(always)]
    fn parse4<C: Frame>(ctx: &C) -> Option<Self> {
        let version_ihl: u8 = ctx.load(ETH_HLEN)?;
        if version_ihl >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(version_ihl & 0x0f);
        if ihl < 5 {
            return None;
        }
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?);
        if frag & IP_MF_OFFSET != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9)?;
        Self::with_ports(
            ctx,
            proto,
            ETH_HLEN + ihl * 4,
            to_v4_mapped(ctx.load(IP_SRC_OFF)?),
            to_v4_mapped(ctx.load(IP_DST_OFF)?),
            false,
        )
    }

    #[inline(always)]
    fn parse6<C: Frame>(ctx: &C) -> Option<Self> {
        let version: u8 = ctx.load(ETH_HLEN)?;
        if version >> 4 != 6 {
            return None;
        }
        let next_header: u8 = ctx.load(ETH_HLEN + 6)?;
        Self::with_ports(
            ctx,
            next_header,
            ETH_HLEN + IP6_HLEN,
            ctx.load(IP6_SRC_OFF)?,
            ctx.load(IP6_DST_OFF)?,
            true,
        )
    }

    /// The packet, with the ports and TCP flags of the L4 header at `l4_off`.
    #[inline(always)]
    fn with_ports<C: Frame>(
        ctx: &C,
        proto: u8,
        l4_off: usize,
        saddr: [u32; 4],
        daddr: [u32; 4],
        v6: bool,
    ) -> Option<Self> {
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let tcp_flags = if proto == PROTO_TCP {
            ctx.load::<u8>(l4_off + 13)?
        } else {
            0
        };
        Some(Self {
            saddr,
            daddr,
            sport: ctx.load(l4_off)?,
            dport: ctx.load(l4_off + 2)?,
            proto,
            tcp_flags,
            v6,
            l4_off,
        })
    }

    /// Offset of the L4 checksum field (TCP: 16, UDP: 6 bytes into the header).
    #[inline(always)]
    fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    /// Extra flags of an L4 checksum update: a UDP checksum of 0 means "none" (IPv4) and
    /// stays 0.
    #[inline(always)]
    fn l4_flags(&self) -> u64 {
        if self.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }

    /// Rewrites the destination to `addr:port` (network order; `addr` of the packet's
    /// family, IPv4-mapped for IPv4).
    #[inline(always)]
    pub fn set_dst<C: Frame>(
        &mut self,
        ctx: &C,
        addr: [u32; 4],
        port: u16,
    ) -> Result<(), RewriteError> {
        let off = if self.v6 { IP6_DST_OFF } else { IP_DST_OFF };
        self.set_addr(ctx, off, &self.daddr, &addr)?;
        self.set_port(ctx, self.l4_off + 2, self.dport, port)?;
        self.daddr = addr;
        self.dport = port;
        Ok(())
    }

    /// Rewrites the source to `addr:port` (as [`Packet::set_dst`]).
    #[inline(always)]
    pub fn set_src<C: Frame>(
        &mut self,
        ctx: &C,
        addr: [u32; 4],
        port: u16,
    ) -> Result<(), RewriteError> {
        let off = if self.v6 { IP6_SRC_OFF } else { IP_SRC_OFF };
        self.set_addr(ctx, off, &self.saddr, &addr)?;
        self.set_port(ctx, self.l4_off, self.sport, port)?;
        self.saddr = addr;
        self.sport = port;
        Ok(())
    }

    #[inline(always)]
    fn set_addr<C: Frame>(
        &self,
        ctx: &C,
        off: usize,
        old: &[u32; 4],
        new: &[u32; 4],
    ) -> Result<(), RewriteError> {
        if same_addr(old, new) {
            return Ok(());
        }
        if !self.v6 {
            let (old, new) = (old[3], new[3]);
            let flags = u64::from(BPF_F_PSEUDO_HDR) | self.l4_flags() | 4;
            ctx.l4_csum_replace(self.csum_off(), u64::from(old), u64::from(new), flags)?;
            ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)?;
            return ctx.store(off, &new);
        }
        // IPv6 has no header checksum; the L4 one covers both addresses through the
        // pseudo-header: fold the 16-byte difference in.
        let mut from = *old;
        let mut to = *new;
        // SAFETY: two 16-byte stack buffers of the sizes passed.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(RewriteError);
        }
        let flags = u64::from(BPF_F_PSEUDO_HDR) | self.l4_flags();
        ctx.l4_csum_replace(self.csum_off(), 0, diff as u64, flags)?;
        ctx.store(off, new)
    }

    #[inline(always)]
    fn set_port<C: Frame>(
        &self,
        ctx: &C,
        off: usize,
        old: u16,
        new: u16,
    ) -> Result<(), RewriteError> {
        if old == new {
            return Ok(());
        }
        let flags = self.l4_flags() | 2;
        ctx.l4_csum_replace(self.csum_off(), u64::from(old), u64::from(new), flags)?;
        ctx.store(off, &new)
    }
}

/// The address of the `T` at `off` bytes into the packet, if it lies within the linear
/// data (XDP: the first buffer). Every offset of the datapath is below 256 (Ethernet, at most 60 bytes of IPv4
/// header or the fixed IPv6 one, then the L4 fields used): the mask shows the verifier the
/// bound it needs for a variable offset from the packet pointer.
#[inline(always)]
pub fn direct<T, C: Frame>(ctx: &C, off: usize) -> Option<usize> {
    let at = ctx.data() + (off & 0xff);
    if off > 0xff || at + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(at)
}

/// The kernel's `bpf_l4_csum_replace` for a checksum that is complete (an IPv4 header's;
/// any at XDP, where packets come from the wire), in software (RFC 1624: `HC' = ~(~HC + ~m + m')`): the
/// checksum at `off` for the `flags & 0xf` bytes (2 or 4) `from` becoming `to`, or with a
/// size of 0 for the `bpf_csum_diff` result `to`. Values stay in memory order throughout:
/// the one's-complement sum is the same in either byte order.
#[inline(always)]
pub fn csum_replace<C: Frame>(
    ctx: &C,
    off: usize,
    from: u64,
    to: u64,
    flags: u64,
) -> Result<(), RewriteError> {
    let at = direct::<u16, C>(ctx, off).ok_or(RewriteError)?;
    // SAFETY: within the linear data, checked by `direct`; headers are not aligned.
    let old = unsafe { (at as *const u16).read_unaligned() };
    let mangled_0 = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
    // A UDP checksum of 0: none was computed (IPv4), and none is.
    if mangled_0 && old == 0 {
        return Ok(());
    }
    let word = |v: u64, shift: u32| u64::from((v >> shift) as u16);
    let mut sum = u64::from(!old);
    match flags & 0xf {
        0 => sum += to & 0xffff_ffff,
        2 => sum += u64::from(!(from as u16)) + word(to, 0),
        4 => {
            sum += u64::from(!(from as u16))
                + u64::from(!((from >> 16) as u16))
                + word(to, 0)
                + word(to, 16);
        }
        _ => return Err(RewriteError),
    }
    let mut new = !fold(sum);
    if mangled_0 && new == 0 {
        new = 0xffff;
    }
    write_at(at, &new);
    Ok(())
}

/// Copies `value` to the packet at `at`, an address [`direct`] gave for a `T` (after the
/// last helper that could move the packet's data).
#[inline(always)]
pub fn write_at<T>(at: usize, value: &T) {
    // SAFETY: within the linear data, checked by `direct`; `value` is a valid `T`, copied
    // byte for byte (headers are not aligned).
    unsafe {
        core::ptr::copy_nonoverlapping(
            core::ptr::from_ref(value).cast::<u8>(),
            at as *mut u8,
            size_of::<T>(),
        );
    }
}

/// Folds a one's-complement sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
