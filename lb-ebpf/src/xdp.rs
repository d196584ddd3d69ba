//! XDP on the external devices (`--nodeport-acceleration`, Cilium's name): packets from
//! outside the node to a NodePort, an external IP or a LoadBalancer IP are translated in the
//! driver, before the kernel allocates a socket buffer for them. The translation is tc
//! ingress's own (`tc::ingress` over [`Frame`]), on the same conntrack, affinity and
//! service maps, so a flow may start at XDP and go on at tc (or the other way round, after
//! the agent switches) without noticing; replies leave through tc egress as before.
//!
//! XDP rewrites the headers and checksums and lets the kernel route the packet to its pod
//! (`XDP_PASS`). What it does not do itself it leaves, untranslated, to tc ingress:
//! - SNATed packets (to a backend on another node under `externalTrafficPolicy: Cluster`,
//!   and their replies): their source becomes a node address, which the kernel's input path
//!   drops as a martian, so they must be redirected to their next hop. XDP records the flow
//!   (backend, SNAT port) and tc, finding it tracked, rewrites and redirects it.
//! - Rejects of a Service without endpoints: the ICMP reply is a new packet.
//!
//! A packet XDP translated carries a mark in its XDP metadata (which the kernel hands to
//! tc as the skb's `data_meta`): tc ingress lets such a packet through untouched, so no
//! packet is translated twice. A driver without metadata support gets no XDP translation
//! at all (everything goes on to tc).
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};
use lb_common::MON_HOOK_XDP;

use crate::{
    nat::{Frame, Packet, RewriteError, csum_replace, direct, write_at},
    tc::{self, Error, Origin, Outcome},
};

/// The mark of a packet translated at XDP, in its first 4 bytes of metadata ("LBXD").
const TRANSLATED: u32 = 0x4c42_5844;
/// Bytes of metadata reserved for the mark.
const META_LEN: i32 = 4;

/// Runs tc's ingress translation on a packet from outside the node; the XDP action.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    // Room for the mark first: without it, tc could not tell a translated packet.
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -META_LEN) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let result = tc::ingress(ctx, Origin::Outside);
    match result {
        Ok(Outcome::Translated) => {
            if mark(ctx) {
                xdp_action::XDP_PASS
            } else {
                // Cannot happen (the room was made above); translated but unmarked, the
                // packet could be translated again at tc.
                tc::dropped(ctx, &Error::Rewrite);
                xdp_action::XDP_DROP
            }
        }
        // Replies of SNATed flows are redirected at tc, never here.
        Ok(Outcome::Untouched | Outcome::Redirected(_))
        | Err(Error::LeftToTc | Error::NoBackends { local: false }) => {
            // The packet goes on as it came.
            // SAFETY: helper on the program's own context; gives back what was reserved.
            unsafe { bpf_xdp_adjust_meta(ctx.ctx, META_LEN) };
            xdp_action::XDP_PASS
        }
        Err(error) => {
            tc::dropped(ctx, &error);
            xdp_action::XDP_DROP
        }
    }
}

/// Writes the mark into the metadata reserved by [`ingress`].
#[inline(always)]
fn mark(ctx: &XdpContext) -> bool {
    let meta = ctx.metadata();
    if meta + META_LEN as usize > ctx.data() {
        return false;
    }
    // SAFETY: within [data_meta, data), checked just above.
    unsafe { (meta as *mut u32).write_unaligned(TRANSLATED) };
    true
}

/// Whether XDP translated this packet already (tc ingress then leaves it alone).
#[inline(always)]
pub fn translated(ctx: &TcContext) -> bool {
    // SAFETY: the skb context is valid for the run of the program.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta, (*ctx.skb.skb).data) };
    let (meta, data) = (meta as usize, data as usize);
    if meta + META_LEN as usize > data {
        return false;
    }
    // SAFETY: within [data_meta, data), checked just above.
    unsafe { (meta as *const u32).read_unaligned() == TRANSLATED }
}

impl Frame for XdpContext {
    const SNAT: bool = false;
    const REJECT: bool = false;
    const OUTSIDE_HOOK: u8 = MON_HOOK_XDP;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    /// The headers are in the first buffer of a multi-buffer frame.
    #[inline(always)]
    fn beyond_linear(&self) -> bool {
        false
    }

    /// Read straight from the packet (no helper call) when the bytes are in the first
    /// buffer, as the headers are.
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let at = direct::<T, _>(self, off)?;
        // SAFETY: within [data, data_end), checked by `direct`; headers are not aligned.
        Some(unsafe { (at as *const T).read_unaligned() })
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, value: &T) -> Result<(), RewriteError> {
        let at = direct::<T, _>(self, off).ok_or(RewriteError)?;
        write_at(at, value);
        Ok(())
    }

    #[inline(always)]
    fn l3_csum_replace(
        &self,
        off: usize,
        from: u64,
        to: u64,
        size: u64,
    ) -> Result<(), RewriteError> {
        csum_replace(self, off, from, to, size)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &self,
        off: usize,
        from: u64,
        to: u64,
        flags: u64,
    ) -> Result<(), RewriteError> {
        csum_replace(self, off, from, to, flags)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    /// Never asked ([`Frame::SNAT`] is false): SNATed packets are redirected at tc.
    #[inline(always)]
    fn redirect(&self, _packet: &Packet) -> Result<i32, RewriteError> {
        Err(RewriteError)
    }
}
