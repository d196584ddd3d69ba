//! The DNS server (`--dns-addr`): UDP sockets read by [`super::udp`] and a TCP listener
//! served by hickory's server, both answering with one [`RequestHandler`]: the cluster
//! domain from the [`DnsIndex`](super::index::DnsIndex), other names from the node's
//! resolvers (or refused). hickory decodes and encodes every message: a malformed query
//! gets FORMERR, an answer larger than the client's UDP buffer is truncated (TC) so the
//! client asks again over TCP.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_server::{
    Server,
    net::{runtime::Time, xfer::Protocol},
    proto::{
        op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode},
        rr::{DNSClass, Name, Record, RecordType},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tracing::{debug, info};

use super::{
    answer::{Resolution, Zone, resolve},
    forward,
    index::SharedDnsIndex,
};

/// The largest UDP answer lb sends, whatever the client offers (RFC 9715's advice keeps
/// answers below fragmentation).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// What the server answers and where it sends the rest.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub addr: SocketAddr,
    pub zone: Zone,
    /// Resolvers for names outside the zone; empty: such names are refused.
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Clone)]
struct Handler {
    index: SharedDnsIndex,
    zone: Zone,
    upstreams: Arc<[SocketAddr]>,
}

/// UDP sockets the server reads, one per worker thread of the agent's runtime.
const UDP_SOCKETS: usize = 2;

/// A non-blocking UDP socket bound to `addr` with `SO_REUSEPORT`.
fn reuse_port_udp(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Binds `config.addr` (UDP and TCP) and serves until the task is aborted.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    config: DnsConfig,
    index: SharedDnsIndex,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // One UDP socket per worker thread, on one port (SO_REUSEPORT): the kernel spreads the
    // queries over them, so each thread receives and answers its own (0.76 -> 0.96 x
    // dnsmasq's queries per second at 1,000 Services). A plain bind first: a port another
    // process (or agent) holds is refused as before, never silently shared.
    drop(std::net::UdpSocket::bind(config.addr)?);
    let udp: Vec<tokio::net::UdpSocket> = (0..UDP_SOCKETS)
        .map(|_| reuse_port_udp(config.addr))
        .collect::<std::io::Result<_>>()?;
    let tcp = tokio::net::TcpListener::bind(config.addr).await?;
    info!(
        addr = %config.addr,
        domain = %config.zone.domain,
        upstreams = ?config.upstreams,
        "DNS listening"
    );
    let handler = Handler {
        index,
        zone: config.zone,
        upstreams: config.upstreams.into(),
    };
    let mut udp_tasks = tokio::task::JoinSet::new();
    let shared = Arc::new(handler.clone());
    for socket in udp {
        udp_tasks.spawn(super::udp::serve(Arc::new(socket), Arc::clone(&shared)));
    }
    let mut server = Server::new(handler);
    server.register_listener(tcp, TCP_IDLE, 64);
    Ok(tokio::spawn(async move {
        // Aborting this task drops the set, which aborts the UDP tasks.
        let _udp = udp_tasks;
        if let Err(e) = server.block_until_done().await {
            tracing::error!(error = %e, "the DNS server stopped");
        }
    }))
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        // The response offers the client's buffer size (bounded), which also bounds the
        // UDP answer: what does not fit is truncated.
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let query = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => info.query,
            Ok(_) => return error(response, builder, metadata, ResponseCode::NotImp).await,
            Err(_) => return error(response, builder, metadata, ResponseCode::FormErr).await,
        };
        if query.query_class() != DNSClass::IN {
            return error(response, builder, metadata, ResponseCode::Refused).await;
        }
        let qname = query.name().to_string();
        let qtype = query.query_type();
        let resolution = {
            let index = self
                .index
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            resolve(&index, &self.zone, &qname, qtype)
        };
        metadata.recursion_available = !self.upstreams.is_empty();
        match resolution {
            Resolution::Authoritative {
                nxdomain,
                mut answers,
                additionals,
                chase,
            } => {
                metadata.authoritative = true;
                metadata.response_code = if nxdomain {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                if let Some(target) = chase {
                    answers.extend(self.chase(&target, qtype, request.protocol()).await);
                }
                let soa = answers.is_empty().then(|| self.zone.soa());
                let message =
                    builder.build(metadata, answers.iter(), [], soa.iter(), additionals.iter());
                send(response, message, metadata).await
            }
            Resolution::NotOurs if self.upstreams.is_empty() => {
                error(response, builder, metadata, ResponseCode::Refused).await
            }
            Resolution::NotOurs => {
                let tcp = request.protocol() == Protocol::Tcp;
                match forward::forward(&self.upstreams, request.as_slice(), tcp).await {
                    Ok(upstream) => {
                        metadata.response_code = upstream.metadata.response_code;
                        metadata.truncation = upstream.metadata.truncation;
                        metadata.authentic_data = upstream.metadata.authentic_data;
                        let message = builder.build(
                            metadata,
                            upstream.answers.iter(),
                            upstream.authorities.iter(),
                            [],
                            upstream.additionals.iter(),
                        );
                        send(response, message, metadata).await
                    }
                    Err(e) => {
                        debug!(error = %e, name = %qname, "forwarding failed");
                        error(response, builder, metadata, ResponseCode::ServFail).await
                    }
                }
            }
        }
    }
}

impl Handler {
    /// The records of an ExternalName Service's target outside the zone, from upstream
    /// (none when forwarding is off or fails: the client follows the CNAME itself).
    async fn chase(&self, target: &Name, qtype: RecordType, protocol: Protocol) -> Vec<Record> {
        if self.upstreams.is_empty() || qtype == RecordType::CNAME {
            return Vec::new();
        }
        let mut query = Message::query();
        query.metadata.id = rand_id();
        query.metadata.recursion_desired = true;
        query.add_query(hickory_server::proto::op::Query::query(
            target.clone(),
            qtype,
        ));
        let Ok(bytes) = query.to_vec() else {
            return Vec::new();
        };
        match forward::forward(&self.upstreams, &bytes, protocol == Protocol::Tcp).await {
            Ok(answer) => answer.answers,
            Err(e) => {
                debug!(error = %e, %target, "resolving an ExternalName target failed");
                Vec::new()
            }
        }
    }
}

/// A query id for lb's own upstream queries.
fn rand_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ (nanos >> 16)) as u16
}

async fn send<'a, R: ResponseHandler>(
    mut response: R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    metadata: Metadata,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "sending a DNS answer failed");
            failed(metadata)
        }
    }
}

async fn error<R: ResponseHandler>(
    response: R,
    builder: MessageResponseBuilder<'_>,
    mut metadata: Metadata,
    code: ResponseCode,
) -> ResponseInfo {
    metadata.response_code = code;
    let message = builder.build_no_records(metadata);
    send(response, message, metadata).await
}

fn failed(mut metadata: Metadata) -> ResponseInfo {
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}
