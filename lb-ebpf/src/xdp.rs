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
//! XDP needs no mark to tell tc what it translated: a translated packet is addressed to its
//! backend, which is no frontend, and `tc::ingress` recognises the rare backend that is one
//! (a host-network pod on a node port) by the flow's reply entry (`tc::translated_already`).
//! (A mark in the XDP metadata would spare tc ingress its lookups, but kernels may refuse
//! `bpf_xdp_adjust_meta` to XDP programs altogether: this machine's 6.18 does.)
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::MON_HOOK_XDP;

use crate::{
    nat::{Frame, Packet, RewriteError, csum_replace, direct, write_at},
    tc::{self, Error, Origin, Outcome},
};

/// Runs tc's ingress translation on a packet from outside the node; the XDP action.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    match tc::ingress(ctx, Origin::Outside) {
        // Translated, or left (untranslated) to tc: the kernel takes it on. Replies of
        // SNATed flows are redirected at tc, never here.
        Ok(Outcome::Translated | Outcome::Untouched | Outcome::Redirected(_))
        | Err(Error::LeftToTc | Error::NoBackends { local: false }) => xdp_action::XDP_PASS,
        Err(error) => {
            tc::dropped(ctx, &error);
            xdp_action::XDP_DROP
        }
    }
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
