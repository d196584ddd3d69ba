//! Packet parsing and rewriting for the tc datapath (IPv4 over Ethernet). Every access goes
//! through `bpf_skb_load_bytes`/`bpf_skb_store_bytes`, so the verifier needs no packet
//! pointer bounds; checksums are fixed incrementally, with the L4 checksum's own offset
//! (never a port's offset) and the pseudo-header flag for addresses.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{PROTO_TCP, PROTO_UDP};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
/// The More Fragments flag and the fragment offset of `frag_off` (host order).
const IP_MF_OFFSET: u16 = 0x3fff;

/// An error of a helper that rewrote part of a packet: the packet must not go on.
pub struct RewriteError;

/// The 5-tuple of an IPv4 TCP or UDP packet and where its L4 header is.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    /// Ports in network byte order, as in the packet.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    l4_off: usize,
}

/// TCP header flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Packet {
    /// Parses an IPv4 TCP or UDP packet; `None` for anything else, and for fragments (a
    /// later fragment has no ports: they pass untranslated, as the first one's flow would
    /// need reassembly state this increment does not keep).
    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Option<Self> {
        let ether_type = u16::from_be(ctx.load::<u16>(12).ok()?);
        if ether_type != ETH_P_IP {
            return None;
        }
        let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        if version_ihl >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(version_ihl & 0x0f);
        if ihl < 5 {
            return None;
        }
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
        if frag & IP_MF_OFFSET != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let l4_off = ETH_HLEN + ihl * 4;
        let tcp_flags = if proto == PROTO_TCP {
            ctx.load::<u8>(l4_off + 13).ok()?
        } else {
            0
        };
        Some(Self {
            saddr: ctx.load(IP_SRC_OFF).ok()?,
            daddr: ctx.load(IP_DST_OFF).ok()?,
            sport: ctx.load(l4_off).ok()?,
            dport: ctx.load(l4_off + 2).ok()?,
            proto,
            tcp_flags,
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

    /// Extra flags of an L4 checksum update: a UDP checksum of 0 means "none" and stays 0.
    #[inline(always)]
    fn l4_flags(&self) -> u64 {
        if self.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }

    /// Rewrites the destination to `addr:port` (network order).
    #[inline(always)]
    pub fn set_dst(&mut self, ctx: &TcContext, addr: u32, port: u16) -> Result<(), RewriteError> {
        self.set_addr(ctx, IP_DST_OFF, self.daddr, addr)?;
        self.set_port(ctx, self.l4_off + 2, self.dport, port)?;
        self.daddr = addr;
        self.dport = port;
        Ok(())
    }

    /// Rewrites the source to `addr:port` (network order).
    #[inline(always)]
    pub fn set_src(&mut self, ctx: &TcContext, addr: u32, port: u16) -> Result<(), RewriteError> {
        self.set_addr(ctx, IP_SRC_OFF, self.saddr, addr)?;
        self.set_port(ctx, self.l4_off, self.sport, port)?;
        self.saddr = addr;
        self.sport = port;
        Ok(())
    }

    #[inline(always)]
    fn set_addr(
        &self,
        ctx: &TcContext,
        off: usize,
        old: u32,
        new: u32,
    ) -> Result<(), RewriteError> {
        if old == new {
            return Ok(());
        }
        let flags = u64::from(BPF_F_PSEUDO_HDR) | self.l4_flags() | 4;
        ctx.l4_csum_replace(self.csum_off(), u64::from(old), u64::from(new), flags)
            .map_err(|_| RewriteError)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
            .map_err(|_| RewriteError)?;
        ctx.store(off, &new, 0).map_err(|_| RewriteError)
    }

    #[inline(always)]
    fn set_port(
        &self,
        ctx: &TcContext,
        off: usize,
        old: u16,
        new: u16,
    ) -> Result<(), RewriteError> {
        if old == new {
            return Ok(());
        }
        let flags = self.l4_flags() | 2;
        ctx.l4_csum_replace(self.csum_off(), u64::from(old), u64::from(new), flags)
            .map_err(|_| RewriteError)?;
        ctx.store(off, &new, 0).map_err(|_| RewriteError)
    }
}
