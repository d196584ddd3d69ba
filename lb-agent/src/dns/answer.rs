//! The answers of the Kubernetes DNS-based service discovery specification
//! (kubernetes/dns `docs/specification.md`), from the [`DnsIndex`]: pure, no I/O.
//!
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA of the ClusterIPs; of a headless Service its ready
//!   endpoints (NXDOMAIN when it has none); an ExternalName Service's CNAME.
//! - `<hostname>.<svc>.<ns>.svc.<zone>`: A/AAAA of a headless Service's endpoint.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV of each named port (of each ready
//!   endpoint of a headless Service), the targets' addresses in the additional section.
//! - `<d>.<c>.<b>.<a>.in-addr.arpa` (and `ip6.arpa`): PTR of ClusterIPs and endpoints.
//! - `dns-version.<zone>`: TXT with the schema version; `<a>-<b>-<c>-<d>.<ns>.pod.<zone>`:
//!   the deprecated pod A record the specification still requires.
//!
//! A name that exists without records of the asked type (the zone, `svc.<zone>`, an
//! existing namespace, a Service asked for another type) is NODATA: NOERROR, no answer,
//! the zone's SOA in the authority section; any other name in the zone is NXDOMAIN.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{
    Name, RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT},
};

use super::{
    index::DnsIndex,
    records::{Answer, ServiceRecords},
};
use crate::model::{ObjectRef, Protocol};

/// The version of the specification followed.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// The cluster domain and the TTL of every record.
#[derive(Clone, Debug)]
pub struct Zone {
    /// Lower case, without the trailing dot (`cluster.local`).
    pub domain: String,
    pub ttl: u32,
}

/// What the index says of a question.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution {
    /// An authoritative answer: NOERROR (no answers: NODATA) or NXDOMAIN.
    Authoritative {
        nxdomain: bool,
        answers: Vec<Record>,
        additionals: Vec<Record>,
        /// An ExternalName Service's target outside the zone, for the caller to resolve
        /// (the answers hold the CNAME).
        chase: Option<Name>,
    },
    /// Not the cluster's name (outside the zone, or an address lb does not know).
    NotOurs,
}

impl Resolution {
    fn records(answers: Vec<Record>) -> Self {
        Self::Authoritative {
            nxdomain: false,
            answers,
            additionals: Vec::new(),
            chase: None,
        }
    }

    const fn nxdomain() -> Self {
        Self::Authoritative {
            nxdomain: true,
            answers: Vec::new(),
            additionals: Vec::new(),
            chase: None,
        }
    }

    fn nodata() -> Self {
        Self::records(Vec::new())
    }
}

impl Zone {
    /// The zone's SOA record (the authority of negative answers).
    #[must_use]
    pub fn soa(&self) -> Record {
        let soa = SOA::new(
            self.name(&format!("ns.dns.{}", self.domain)),
            self.name(&format!("hostmaster.{}", self.domain)),
            1,
            7200,
            1800,
            86400,
            self.ttl,
        );
        Record::from_rdata(self.name(&self.domain), self.ttl, RData::SOA(soa))
    }

    fn name(&self, text: &str) -> Name {
        Name::from_ascii(format!("{text}.")).unwrap_or_else(|_| Name::root())
    }

    fn service_name(&self, id: &ObjectRef) -> String {
        format!("{}.{}.svc.{}", id.name(), id.namespace(), self.domain).to_ascii_lowercase()
    }

    fn record(&self, name: &Name, rdata: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, rdata)
    }
}

/// Answers `qname` (lower case, with or without the trailing dot) for `qtype`.
#[must_use]
pub fn resolve(index: &DnsIndex, zone: &Zone, qname: &str, qtype: RecordType) -> Resolution {
    let qname = qname.strip_suffix('.').unwrap_or(qname);
    if let Some(ip) = reverse_ip(qname) {
        return reverse(index, zone, qname, ip, qtype);
    }
    if qname == zone.domain {
        let answers = if wants(qtype, RecordType::SOA) {
            vec![zone.soa()]
        } else {
            Vec::new()
        };
        return Resolution::records(answers);
    }
    let Some(relative) = qname
        .strip_suffix(zone.domain.as_str())
        .and_then(|r| r.strip_suffix('.'))
    else {
        return Resolution::NotOurs;
    };
    let owner = zone.name(qname);
    if relative == "dns-version" {
        let answers = if wants(qtype, RecordType::TXT) {
            let txt = TXT::new(vec![SCHEMA_VERSION.to_string()]);
            vec![zone.record(&owner, RData::TXT(txt))]
        } else {
            Vec::new()
        };
        return Resolution::records(answers);
    }
    let labels: Vec<&str> = relative.split('.').collect();
    match labels.split_last() {
        Some((&"svc", rest)) => services(index, zone, &owner, rest, qtype),
        Some((&"pod", rest)) => pod(zone, &owner, rest, qtype),
        _ => Resolution::nxdomain(),
    }
}

/// Whether a question for `qtype` is answered by a record of `rtype`.
fn wants(qtype: RecordType, rtype: RecordType) -> bool {
    qtype == rtype || qtype == RecordType::ANY
}

/// Names under `svc.<zone>`; `labels` are those before `svc`.
fn services(
    index: &DnsIndex,
    zone: &Zone,
    owner: &Name,
    labels: &[&str],
    qtype: RecordType,
) -> Resolution {
    let service = |name: &str, namespace: &str| index.service(namespace, name);
    match *labels {
        [] => Resolution::nodata(),
        [namespace] if index.namespace_exists(namespace) => Resolution::nodata(),
        [name, namespace] => match service(name, namespace) {
            Some((_, records)) => service_answer(index, zone, owner, records, qtype),
            None => Resolution::nxdomain(),
        },
        [first, name, namespace] => {
            let Some((_, records)) = service(name, namespace) else {
                return Resolution::nxdomain();
            };
            if let Some(proto) = first.strip_prefix('_') {
                // `_<proto>.<svc>...`: exists when a named port of that protocol does.
                let exists = protocol(proto).is_some_and(|p| {
                    records
                        .ports()
                        .iter()
                        .any(|&(name, _, proto)| !name.is_empty() && proto == p)
                });
                return if exists && has_addresses(records) {
                    Resolution::nodata()
                } else {
                    Resolution::nxdomain()
                };
            }
            let Answer::Headless(endpoints) = records.answer() else {
                return Resolution::nxdomain();
            };
            let ips: Vec<IpAddr> = endpoints
                .iter()
                .filter(|e| e.hostname.eq_ignore_ascii_case(first))
                .map(|e| e.ip)
                .collect();
            if ips.is_empty() {
                return Resolution::nxdomain();
            }
            Resolution::records(address_records(zone, owner, ips, qtype))
        }
        [port, proto, name, namespace] => {
            let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_'))
            else {
                return Resolution::nxdomain();
            };
            match (service(name, namespace), protocol(proto)) {
                (Some((id, records)), Some(proto)) => {
                    srv(zone, owner, id, records, port, proto, qtype)
                }
                _ => Resolution::nxdomain(),
            }
        }
        _ => Resolution::nxdomain(),
    }
}

fn protocol(label: &str) -> Option<Protocol> {
    match label {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    }
}

/// A headless Service without ready endpoints has no name (the specification's NXDOMAIN).
fn has_addresses(records: &ServiceRecords) -> bool {
    !matches!(records.answer(), Answer::Headless(endpoints) if endpoints.is_empty())
}

/// The A and AAAA records of `ips` a question for `qtype` wants.
fn address_records(
    zone: &Zone,
    owner: &Name,
    ips: impl IntoIterator<Item = IpAddr>,
    qtype: RecordType,
) -> Vec<Record> {
    ips.into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) if wants(qtype, RecordType::A) => {
                Some(zone.record(owner, RData::A(A(v4))))
            }
            IpAddr::V6(v6) if wants(qtype, RecordType::AAAA) => {
                Some(zone.record(owner, RData::AAAA(AAAA(v6))))
            }
            _ => None,
        })
        .collect()
}

/// `<svc>.<ns>.svc.<zone>`.
fn service_answer(
    index: &DnsIndex,
    zone: &Zone,
    owner: &Name,
    records: &ServiceRecords,
    qtype: RecordType,
) -> Resolution {
    match records.answer() {
        Answer::ExternalName(target) => {
            let target_name = zone.name(&target.to_ascii_lowercase());
            let mut answers = vec![zone.record(owner, RData::CNAME(CNAME(target_name.clone())))];
            if qtype == RecordType::CNAME {
                return Resolution::records(answers);
            }
            // A target in the zone is answered here, once (no CNAME chains); one outside
            // is the caller's to resolve.
            match resolve(index, zone, &target.to_ascii_lowercase(), qtype) {
                Resolution::NotOurs => Resolution::Authoritative {
                    nxdomain: false,
                    answers,
                    additionals: Vec::new(),
                    chase: Some(target_name),
                },
                Resolution::Authoritative {
                    answers: more,
                    additionals,
                    ..
                } => {
                    answers.extend(
                        more.into_iter()
                            .filter(|r| r.record_type() != RecordType::CNAME),
                    );
                    Resolution::Authoritative {
                        nxdomain: false,
                        answers,
                        additionals,
                        chase: None,
                    }
                }
            }
        }
        _ if !has_addresses(records) => Resolution::nxdomain(),
        _ => Resolution::records(address_records(zone, owner, records.addresses(), qtype)),
    }
}

/// `_<port>._<proto>.<svc>.<ns>.svc.<zone>`.
fn srv(
    zone: &Zone,
    owner: &Name,
    id: &ObjectRef,
    records: &ServiceRecords,
    port_name: &str,
    proto: Protocol,
    qtype: RecordType,
) -> Resolution {
    let ports = records.ports();
    let Some(&(_, port_number, _)) = ports.iter().find(|&&(name, _, p)| {
        !name.is_empty() && name.eq_ignore_ascii_case(port_name) && p == proto
    }) else {
        return Resolution::nxdomain();
    };
    if !has_addresses(records) {
        return Resolution::nxdomain();
    }
    let service_name = zone.service_name(id);
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    match records.answer() {
        Answer::Headless(endpoints) => {
            for endpoint in endpoints {
                let Some(&(_, number, _)) = endpoint
                    .ports
                    .iter()
                    .find(|(name, _, p)| name.eq_ignore_ascii_case(port_name) && *p == proto)
                else {
                    continue;
                };
                let target = zone.name(&format!("{}.{service_name}", endpoint.hostname));
                if wants(qtype, RecordType::SRV) {
                    let srv = SRV::new(0, 100, number, target.clone());
                    answers.push(zone.record(owner, RData::SRV(srv)));
                    additionals.extend(address_records(
                        zone,
                        &target,
                        [endpoint.ip],
                        RecordType::ANY,
                    ));
                }
            }
        }
        _ => {
            let target = zone.name(&service_name);
            if wants(qtype, RecordType::SRV) {
                let srv = SRV::new(0, 100, port_number, target.clone());
                answers.push(zone.record(owner, RData::SRV(srv)));
                additionals = address_records(zone, &target, records.addresses(), RecordType::ANY);
            }
        }
    }
    Resolution::Authoritative {
        nxdomain: false,
        answers,
        additionals,
        chase: None,
    }
}

/// `<a>-<b>-<c>-<d>.<ns>.pod.<zone>` (deprecated, still required).
fn pod(zone: &Zone, owner: &Name, labels: &[&str], qtype: RecordType) -> Resolution {
    match *labels {
        [] | [_] => Resolution::nodata(),
        [address, _namespace] => {
            let v4 = address
                .replace('-', ".")
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4);
            let v6 = address
                .replace('-', ":")
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6);
            match v4.or(v6) {
                Ok(ip) => Resolution::records(address_records(zone, owner, [ip], qtype)),
                Err(_) => Resolution::nxdomain(),
            }
        }
        _ => Resolution::nxdomain(),
    }
}

/// A PTR question for an address lb knows; others are not the cluster's.
fn reverse(
    index: &DnsIndex,
    zone: &Zone,
    qname: &str,
    ip: IpAddr,
    qtype: RecordType,
) -> Resolution {
    let mut names = Vec::new();
    for (id, records) in index.ptr(&ip) {
        let service = zone.service_name(id);
        match records.answer() {
            Answer::Headless(endpoints) => names.extend(
                endpoints
                    .iter()
                    .filter(|e| e.ip == ip)
                    .map(|e| format!("{}.{service}", e.hostname)),
            ),
            _ => names.push(service),
        }
    }
    if names.is_empty() {
        return Resolution::NotOurs;
    }
    let owner = zone.name(qname);
    let answers = if wants(qtype, RecordType::PTR) {
        names
            .iter()
            .map(|name| zone.record(&owner, RData::PTR(PTR(zone.name(name)))))
            .collect()
    } else {
        Vec::new()
    };
    Resolution::records(answers)
}

/// The address of a reverse name (`4.3.2.1.in-addr.arpa`, 32 nibbles `.ip6.arpa`).
fn reverse_ip(qname: &str) -> Option<IpAddr> {
    if let Some(rest) = qname.strip_suffix(".in-addr.arpa") {
        let mut octets = [0u8; 4];
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() != 4 {
            return None;
        }
        for (i, label) in labels.iter().rev().enumerate() {
            octets[i] = label.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(octets)));
    }
    let rest = qname.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<&str> = rest.split('.').collect();
    if nibbles.len() != 32 {
        return None;
    }
    let mut value: u128 = 0;
    for nibble in nibbles.iter().rev() {
        value = (value << 4) | u128::from(u8::from_str_radix(nibble, 16).ok()?);
    }
    Some(IpAddr::V6(Ipv6Addr::from(value)))
}

#[cfg(test)]
mod tests;
