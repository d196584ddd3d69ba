//! A decision as the monitor shows it: decoded from the datapath's [`MonitorEvent`], with
//! the names the agent and the host know, as one table line or one JSON object.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_common::{
    MON_HOOK_CONNECT, MON_HOOK_SENDMSG, MON_HOOK_TC_EXTERNAL, MON_HOOK_TC_POD, MON_HOOK_XDP,
    MON_OUT_FIREWALLED, MON_OUT_NO_ENDPOINTS, MON_OUT_NO_LOCAL_ENDPOINTS, MON_OUT_TRANSLATED,
    MON_PICK_AFFINITY, MON_PICK_SOCKET_HASH, MonitorEvent, SVC_F_LOCAL, v4_mapped,
};
use serde::Serialize;

use crate::maps::codec;

/// One decision.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Decision {
    /// When it was taken (RFC 3339, UTC).
    pub time: String,
    /// `connect`, `sendmsg` (socket hooks), `tc-external` or `tc-pod` (first packet of a
    /// flow at tc).
    pub hook: &'static str,
    pub client: Client,
    /// `address:port/PROTO` as the client dialled it.
    pub frontend: String,
    /// The frontend's id (as `lb-agent services` shows it).
    pub frontend_id: u32,
    /// `namespace/name` of its Service, when the agent told it.
    pub service: Option<String>,
    /// `translated`, `refused` (no endpoints), `dropped` (no local endpoint) or
    /// `firewalled` (outside loadBalancerSourceRanges).
    pub outcome: &'static str,
    /// `address:port` of the backend, when translated.
    pub backend: Option<String>,
    /// Why, in words: `slot 2 of 3, at random`, `kept by session affinity`, `no endpoints`…
    pub reason: String,
    /// The slot picked (`1..=count`; 0: kept by affinity, or none) and the backend count.
    pub slot: u16,
    pub count: u16,
    /// The frontend serves only this node's endpoints (a Local traffic policy).
    pub local_only: bool,
}

/// Who asked.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Client {
    /// tc: the packet's source `address:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Socket hooks: the client's network namespace cookie, and its addresses (empty for
    /// the node's own namespace, `node` then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub netns_addresses: Vec<IpAddr>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub node: bool,
    /// Socket hooks: the calling task's cgroup v2 id, process id and name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

impl Client {
    /// The client's addresses, for `--client`: the packet's source at tc, the network
    /// namespace's at the socket hooks.
    #[must_use]
    pub fn ips(&self) -> Vec<IpAddr> {
        match &self.address {
            Some(a) => a
                .parse::<SocketAddr>()
                .map(|a| a.ip())
                .into_iter()
                .collect(),
            None => self.netns_addresses.clone(),
        }
    }
}

/// Whether `event` was taken at a socket hook.
#[must_use]
pub const fn at_socket(event: &MonitorEvent) -> bool {
    matches!(event.hook, MON_HOOK_CONNECT | MON_HOOK_SENDMSG)
}

/// Decodes `event`, taken at `wall` (its wall-clock time).
#[must_use]
pub fn decode(event: &MonitorEvent, wall: std::time::SystemTime) -> Decision {
    let protocol = codec::protocol(event.proto)
        .map_or_else(|| format!("proto {}", event.proto), |p| p.to_string());
    let frontend = format!(
        "{}/{protocol}",
        SocketAddr::new(ip(&event.frontend), u16::from_be(event.frontend_port))
    );
    let hook = match event.hook {
        MON_HOOK_CONNECT => "connect",
        MON_HOOK_SENDMSG => "sendmsg",
        MON_HOOK_TC_EXTERNAL => "tc-external",
        MON_HOOK_XDP => "xdp",
        MON_HOOK_TC_POD => "tc-pod",
        _ => "unknown",
    };
    let local_only = event.svc_flags & SVC_F_LOCAL != 0;
    let (outcome, reason) = match event.outcome {
        MON_OUT_TRANSLATED => ("translated", pick_reason(event)),
        MON_OUT_NO_ENDPOINTS => ("refused", "no endpoints".to_owned()),
        MON_OUT_NO_LOCAL_ENDPOINTS => (
            "dropped",
            "no endpoint on this node (Local traffic policy)".to_owned(),
        ),
        MON_OUT_FIREWALLED => (
            "firewalled",
            "client outside loadBalancerSourceRanges".to_owned(),
        ),
        other => ("unknown", format!("outcome {other}")),
    };
    let backend = (event.outcome == MON_OUT_TRANSLATED)
        .then(|| SocketAddr::new(ip(&event.backend), u16::from_be(event.backend_port)).to_string());
    let client = if at_socket(event) {
        Client {
            netns_cookie: Some(event.netns_cookie),
            cgroup_id: Some(event.cgroup_id),
            pid: Some(event.pid),
            comm: Some(comm(&event.comm)),
            ..Client::default()
        }
    } else {
        Client {
            address: Some(
                SocketAddr::new(ip(&event.client), u16::from_be(event.client_port)).to_string(),
            ),
            ..Client::default()
        }
    };
    Decision {
        time: k8s_openapi::jiff::Timestamp::try_from(wall)
            .map_or_else(|_| String::new(), |t| format!("{t:.6}")),
        hook,
        client,
        frontend,
        frontend_id: event.rev_nat_id,
        service: None,
        outcome,
        backend,
        reason,
        slot: event.slot,
        count: event.count,
        local_only,
    }
}

fn pick_reason(event: &MonitorEvent) -> String {
    match event.pick {
        MON_PICK_AFFINITY => format!("kept by session affinity ({} endpoint(s))", event.count),
        MON_PICK_SOCKET_HASH => format!(
            "slot {} of {}, by the socket's hash (unconnected UDP)",
            event.slot, event.count
        ),
        _ => format!("slot {} of {}, at random", event.slot, event.count),
    }
}

/// The wall-clock time of a `CLOCK_MONOTONIC` instant, `now` being both clocks' now.
#[must_use]
pub fn wall_time(
    event_ns: u64,
    monotonic_now: Duration,
    wall_now: std::time::SystemTime,
) -> std::time::SystemTime {
    let age = monotonic_now.saturating_sub(Duration::from_nanos(event_ns));
    wall_now.checked_sub(age).unwrap_or(wall_now)
}

fn ip(words: &[u32; 4]) -> IpAddr {
    match v4_mapped(words) {
        Some(word) => IpAddr::V4(codec::from_ip4(word)),
        None => IpAddr::V6(codec::from_ip6(*words)),
    }
}

fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// One line of the table output.
#[must_use]
pub fn line(d: &Decision) -> String {
    let client = match (&d.client.address, d.client.node) {
        (Some(address), _) => address.clone(),
        (None, true) => "node".to_owned(),
        (None, false) if !d.client.netns_addresses.is_empty() => d
            .client
            .netns_addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        (None, false) => "?".to_owned(),
    };
    let mut who = String::new();
    if let Some(cookie) = d.client.netns_cookie {
        who = format!(" [netns {cookie}");
        if let Some(cgroup) = d.client.cgroup_id {
            who += &format!(" cgroup {cgroup}");
        }
        if let (Some(pid), Some(comm)) = (d.client.pid, &d.client.comm) {
            who += &format!(" pid {pid} {comm}");
        }
        who.push(']');
    }
    let service = d
        .service
        .as_ref()
        .map_or_else(String::new, |s| format!(" ({s})"));
    let result = match &d.backend {
        Some(backend) => format!("-> {backend}  {}", d.reason),
        None => format!("{}: {}", d.outcome, d.reason),
    };
    let local = if d.local_only {
        ", local endpoints only"
    } else {
        ""
    };
    format!(
        "{} {:<11} {client}{who} {}{service} {result}{local}",
        d.time, d.hook, d.frontend
    )
}

#[cfg(test)]
mod tests {
    use lb_common::{MON_PICK_RANDOM, PROTO_TCP, to_v4_mapped};

    use super::*;

    fn event() -> MonitorEvent {
        MonitorEvent {
            time_ns: 5_000_000_000,
            hook: MON_HOOK_TC_EXTERNAL,
            client: to_v4_mapped(u32::from_ne_bytes([192, 168, 50, 2])),
            client_port: 40000u16.to_be(),
            frontend: to_v4_mapped(u32::from_ne_bytes([192, 168, 50, 1])),
            frontend_port: 30080u16.to_be(),
            backend: to_v4_mapped(u32::from_ne_bytes([10, 244, 0, 7])),
            backend_port: 8080u16.to_be(),
            proto: PROTO_TCP,
            outcome: MON_OUT_TRANSLATED,
            pick: MON_PICK_RANDOM,
            slot: 2,
            count: 3,
            rev_nat_id: 7,
            svc_flags: SVC_F_LOCAL,
            ..MonitorEvent::default()
        }
    }

    #[test]
    fn a_tc_translation_names_client_frontend_backend_and_slot() {
        let d = decode(&event(), std::time::UNIX_EPOCH);
        assert_eq!(d.client.address.as_deref(), Some("192.168.50.2:40000"));
        assert_eq!(d.frontend, "192.168.50.1:30080/TCP");
        assert_eq!(d.backend.as_deref(), Some("10.244.0.7:8080"));
        assert_eq!(d.reason, "slot 2 of 3, at random");
        assert!(d.local_only);
        let line = line(&d);
        assert!(
            line.contains("192.168.50.2:40000 192.168.50.1:30080/TCP -> 10.244.0.7:8080"),
            "{line}"
        );
    }

    #[test]
    fn a_refusal_at_a_socket_names_the_process() {
        let mut e = event();
        e.hook = MON_HOOK_CONNECT;
        e.outcome = MON_OUT_NO_ENDPOINTS;
        e.netns_cookie = 4097;
        e.pid = 42;
        e.comm[..4].copy_from_slice(b"curl");
        let d = decode(&e, std::time::UNIX_EPOCH);
        assert_eq!((d.outcome, d.backend.as_deref()), ("refused", None));
        assert_eq!(d.client.comm.as_deref(), Some("curl"));
        assert!(line(&d).contains("refused: no endpoints"), "{}", line(&d));
    }

    #[test]
    fn monotonic_times_become_wall_times() {
        let wall_now = std::time::UNIX_EPOCH + Duration::from_secs(100);
        let at = wall_time(9_000_000_000, Duration::from_secs(10), wall_now);
        assert_eq!(at, std::time::UNIX_EPOCH + Duration::from_secs(99));
    }
}
