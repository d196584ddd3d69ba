//! The DNS server (`--dns-addr`): a UDP socket read by threads of its own ([`super::udp`])
//! and a TCP listener served by hickory's server, both answering with one
//! [`RequestHandler`]: the cluster domain from the [`DnsIndex`](super::index::DnsIndex),
//! other names from the node's resolvers (or refused). hickory decodes and encodes every
//! message: a malformed query gets FORMERR, an answer larger than the client's UDP buffer
//! is truncated (TC) so the client asks again over TCP. UDP answers from the index are
//! kept encoded ([`super::cache`]) until the index changes.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_server::{
    Server,
    net::{runtime::Time, xfer::Protocol},
    proto::{
        ProtoError,
        op::{Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode},
        rr::{DNSClass, Name, Record, RecordType},
        serialize::binary::{BinDecodable as _, BinDecoder, BinEncoder},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder},
};
use tracing::{debug, info};

use super::{
    answer::{Resolution, Zone, resolve},
    cache::AnswerCache,
    forward,
    index::SharedDnsIndex,
};

/// The largest UDP answer lb sends, whatever the client offers (RFC 9715's advice keeps
/// answers below fragmentation).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// The bytes of queries and encoded answers the UDP answer cache holds at most (about
/// 150,000 A questions and answers; twice that in memory with the table and allocations).
const CACHE_BYTES: usize = 16 << 20;

/// What the server answers and where it sends the rest.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub addr: SocketAddr,
    pub zone: Zone,
    /// Resolvers for names outside the zone; empty: such names are refused.
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Clone)]
pub(super) struct Handler {
    index: SharedDnsIndex,
    zone: Zone,
    upstreams: Arc<[SocketAddr]>,
    cache: Arc<AnswerCache>,
}

/// Binds `config.addr` (UDP and TCP) and serves until the task is aborted.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    config: DnsConfig,
    index: SharedDnsIndex,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let udp = std::net::UdpSocket::bind(config.addr)?;
    let tcp = tokio::net::TcpListener::bind(config.addr).await?;
    info!(
        addr = %config.addr,
        domain = %config.zone.domain,
        upstreams = ?config.upstreams,
        "DNS listening"
    );
    let handler = Handler::new(index, config.zone, config.upstreams);
    let udp = super::udp::start(udp, Arc::new(handler.clone()))?;
    let mut server = Server::new(handler);
    server.register_listener(tcp, TCP_IDLE, 64);
    Ok(tokio::spawn(async move {
        // Aborting this task drops the UDP threads' handle, which stops them.
        let _udp = udp;
        if let Err(e) = server.block_until_done().await {
            tracing::error!(error = %e, "the DNS server stopped");
        }
    }))
}

/// What the index (and the server's settings) make of a request, before any upstream.
enum Plan {
    /// The cluster's answer, from index `generation` (`chase`: an ExternalName target
    /// outside the zone, whose records upstream adds).
    Answer {
        metadata: Metadata,
        answers: Vec<Record>,
        additionals: Vec<Record>,
        chase: Option<Name>,
        generation: u64,
    },
    /// An answer without records.
    Error(Metadata, ResponseCode),
    /// A name for the node's resolvers.
    Forward(Metadata),
}

/// What [`Handler::answer_udp`] made of a UDP query.
pub(super) enum Udp {
    /// The answer is in the buffer.
    Answer,
    /// Nothing to send (the query was an answer, or not even a header).
    Nothing,
    /// An answer that waits for an upstream, for [`RequestHandler::handle_request`].
    Later(Box<Request>),
}

impl Handler {
    fn new(index: SharedDnsIndex, zone: Zone, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            index,
            zone,
            upstreams: upstreams.into(),
            cache: Arc::new(AnswerCache::new(CACHE_BYTES)),
        }
    }

    /// The index's generation now.
    fn generation(&self) -> u64 {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .generation()
    }

    /// Answers the UDP query `query` into `out` unless it waits for an upstream: from the
    /// answer cache when the same bytes were answered by this generation of the index,
    /// else decoded, resolved and encoded by hickory (and cached when the answer came from
    /// the index alone).
    pub(super) fn answer_udp(&self, query: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> Udp {
        if self.cache.get(query, self.generation(), out) {
            return Udp::Answer;
        }
        let request = match Request::from_bytes(query.to_vec(), src, Protocol::Udp) {
            Ok(request) => request,
            Err(e) => return form_error(query, src, &e, out),
        };
        if request.metadata.message_type == MessageType::Response {
            // Never answer an answer (reflection).
            return Udp::Nothing;
        }
        let edns = response_edns(&request);
        let mut builder = MessageResponseBuilder::from_message_request(&request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let (encoded, generation) = match self.plan(&request) {
            Plan::Answer { chase: Some(_), .. } | Plan::Forward(_)
                if !self.upstreams.is_empty() =>
            {
                return Udp::Later(Box::new(request));
            }
            Plan::Answer {
                metadata,
                answers,
                additionals,
                generation,
                // Without upstreams, the client follows the CNAME itself.
                chase: _,
            } => {
                let soa = answers.is_empty().then(|| self.zone.soa());
                let message =
                    builder.build(metadata, answers.iter(), [], soa.iter(), additionals.iter());
                (encode_udp(message, out), Some(generation))
            }
            Plan::Error(mut metadata, code) => {
                metadata.response_code = code;
                (encode_udp(builder.build_no_records(metadata), out), None)
            }
            Plan::Forward(mut metadata) => {
                metadata.response_code = ResponseCode::Refused;
                (encode_udp(builder.build_no_records(metadata), out), None)
            }
        };
        match encoded {
            Ok(_) => {
                if let Some(generation) = generation {
                    self.cache.insert(query, generation, out);
                }
                Udp::Answer
            }
            Err(e) => {
                debug!(error = %e, "encoding a DNS answer failed");
                Udp::Nothing
            }
        }
    }

    /// What the index says of `request`.
    fn plan(&self, request: &Request) -> Plan {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let query = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => info.query,
            Ok(_) => return Plan::Error(metadata, ResponseCode::NotImp),
            Err(_) => return Plan::Error(metadata, ResponseCode::FormErr),
        };
        if query.query_class() != DNSClass::IN {
            return Plan::Error(metadata, ResponseCode::Refused);
        }
        let qname = query.name().to_string();
        let qtype = query.query_type();
        let (resolution, generation) = {
            let index = self
                .index
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (
                resolve(&index, &self.zone, &qname, qtype),
                index.generation(),
            )
        };
        metadata.recursion_available = !self.upstreams.is_empty();
        match resolution {
            Resolution::Authoritative {
                nxdomain,
                answers,
                additionals,
                chase,
            } => {
                metadata.authoritative = true;
                metadata.response_code = if nxdomain {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                Plan::Answer {
                    metadata,
                    answers,
                    additionals,
                    chase,
                    generation,
                }
            }
            Resolution::NotOurs if self.upstreams.is_empty() => {
                Plan::Error(metadata, ResponseCode::Refused)
            }
            Resolution::NotOurs => Plan::Forward(metadata),
        }
    }
}

/// The EDNS of the answer to `request`: the client's buffer size (bounded), which also
/// bounds the UDP answer (what does not fit is truncated).
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|asked| {
        let mut edns = Edns::new();
        edns.set_max_payload(asked.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        edns
    })
}

/// Encodes a UDP answer into `out`. RFC 1035 4.2.1: 512 bytes unless the client offered
/// more with EDNS; what does not fit is left out and the answer marked truncated.
pub(super) fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    out: &mut Vec<u8>,
) -> Result<ResponseInfo, ProtoError> {
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(response.edns().map_or(512, |edns| edns.max_payload()));
    response.destructive_emit(&mut encoder)
}

/// A query that does not decode: FORMERR if its header does (a message shorter than a
/// header is not a query, and gets nothing).
fn form_error(query: &[u8], src: SocketAddr, error: &ProtoError, out: &mut Vec<u8>) -> Udp {
    let Ok(header) = Header::read(&mut BinDecoder::new(query)) else {
        return Udp::Nothing;
    };
    debug!(%src, %error, "undecodable DNS query");
    let answer = Message::error_msg(
        header.metadata.id,
        header.metadata.op_code,
        ResponseCode::FormErr,
    );
    match answer.to_vec() {
        Ok(bytes) => {
            *out = bytes;
            Udp::Answer
        }
        Err(_) => Udp::Nothing,
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        match self.plan(request) {
            Plan::Answer {
                metadata,
                mut answers,
                additionals,
                chase,
                generation: _,
            } => {
                if let Some(target) = chase {
                    let qtype = request
                        .request_info()
                        .map_or(RecordType::A, |info| info.query.query_type());
                    answers.extend(self.chase(&target, qtype, request.protocol()).await);
                }
                let soa = answers.is_empty().then(|| self.zone.soa());
                let message =
                    builder.build(metadata, answers.iter(), [], soa.iter(), additionals.iter());
                send(response, message, metadata).await
            }
            Plan::Error(metadata, code) => error(response, builder, metadata, code).await,
            Plan::Forward(mut metadata) => {
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
                        let name = request.request_info().map(|info| info.query.name().clone());
                        debug!(error = %e, ?name, "forwarding failed");
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

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Instant};

    use hickory_server::proto::{op::Query, rr::RData};

    use super::*;
    use crate::{
        reconcile::{Reconciler, SyncKind},
        source::change::{Change, Kind, Object},
    };

    const CLIENT: &str = "127.0.0.1:40000";

    fn handler(index: SharedDnsIndex, upstreams: Vec<SocketAddr>) -> Handler {
        let zone = Zone {
            domain: "cluster.local".into(),
            ttl: 5,
        };
        Handler::new(index, zone, upstreams)
    }

    fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        let mut query = Message::query();
        query.metadata.id = id;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        query.to_vec().unwrap()
    }

    /// The answer to `bytes` over UDP, decoded.
    fn ask(handler: &Handler, bytes: &[u8]) -> Message {
        let mut out = Vec::new();
        match handler.answer_udp(bytes, CLIENT.parse().unwrap(), &mut out) {
            Udp::Answer => Message::from_vec(&out).unwrap(),
            Udp::Nothing => panic!("no answer"),
            Udp::Later(_) => panic!("an answer from the index waits"),
        }
    }

    /// The response code and the A records of the answer to `name`.
    fn a(handler: &Handler, id: u16, name: &str) -> (ResponseCode, Vec<IpAddr>) {
        let answer = ask(handler, &query(id, name, RecordType::A));
        assert_eq!(answer.metadata.id, id, "the answer carries the query's id");
        let ips = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        (answer.metadata.response_code, ips)
    }

    fn service(name: &str, cluster_ip: &str) -> Change {
        let object = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]},
        }))
        .unwrap();
        Change::Apply {
            origin: Arc::from("services.yaml"),
            object: Object::Service(Box::new(object)),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// An answer served from the cache is the one the index gives now: a Service that
    /// appears, changes its ClusterIP or goes is answered as such right after the sync
    /// that made the change, even for a question answered (and cached) just before.
    #[test]
    fn a_cached_answer_never_outlives_a_change() {
        let mut reconciler = Reconciler::on_fake_maps(None);
        let index = SharedDnsIndex::default();
        reconciler.set_dns_index(index.clone());
        let handler = handler(index, Vec::new());
        let web = "web.default.svc.cluster.local.";
        let sync = |reconciler: &mut Reconciler<_>, change| {
            reconciler.apply(change);
            reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
        };

        // A name before its Service: NXDOMAIN, twice (the second from the cache).
        assert_eq!(a(&handler, 1, web), (ResponseCode::NXDomain, vec![]));
        assert_eq!(a(&handler, 2, web), (ResponseCode::NXDomain, vec![]));
        assert_eq!(handler.cache.len(), 1);

        sync(&mut reconciler, service("web", "10.96.0.5"));
        assert_eq!(
            a(&handler, 3, web),
            (ResponseCode::NoError, vec![ip("10.96.0.5")])
        );
        assert_eq!(
            a(&handler, 4, web),
            (ResponseCode::NoError, vec![ip("10.96.0.5")])
        );

        // Another Service changing makes no stale answer either.
        sync(&mut reconciler, service("other", "10.96.0.9"));
        assert_eq!(
            a(&handler, 5, web),
            (ResponseCode::NoError, vec![ip("10.96.0.5")])
        );

        sync(&mut reconciler, service("web", "10.96.0.6"));
        assert_eq!(
            a(&handler, 6, web),
            (ResponseCode::NoError, vec![ip("10.96.0.6")])
        );

        sync(
            &mut reconciler,
            Change::Delete {
                kind: Kind::Service,
                id: crate::model::ObjectRef::new("default", "web"),
            },
        );
        assert_eq!(a(&handler, 7, web), (ResponseCode::NXDomain, vec![]));
    }

    /// A hit is the answer hickory encodes for the same bytes, but for the id; a question
    /// that differs in case, type or flags is answered on its own.
    #[test]
    fn a_cached_answer_is_the_encoded_one_with_the_querys_id() {
        let mut reconciler = Reconciler::on_fake_maps(None);
        let index = SharedDnsIndex::default();
        reconciler.set_dns_index(index.clone());
        reconciler.apply(service("web", "10.96.0.5"));
        reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
        let handler = handler(index, Vec::new());
        let src: SocketAddr = CLIENT.parse().unwrap();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let web = query(0x1111, "web.default.svc.cluster.local.", RecordType::A);
        assert!(matches!(
            handler.answer_udp(&web, src, &mut first),
            Udp::Answer
        ));
        let mut again = web.clone();
        again[..2].copy_from_slice(&[0x22, 0x22]);
        assert!(matches!(
            handler.answer_udp(&again, src, &mut second),
            Udp::Answer
        ));
        assert_eq!(second[..2], [0x22, 0x22]);
        assert_eq!(first[2..], second[2..]);
        assert_eq!(handler.cache.len(), 1);

        // The name in another case is another entry, its question repeated as asked.
        let upper = ask(
            &handler,
            &query(3, "WEB.default.svc.cluster.local.", RecordType::A),
        );
        assert_eq!(
            upper.queries[0].name().to_ascii(),
            "WEB.default.svc.cluster.local."
        );
        assert_eq!(upper.answers.len(), 1);
        assert_eq!(handler.cache.len(), 2);
        // NODATA for AAAA: the SOA, no answer.
        let aaaa = ask(
            &handler,
            &query(4, "web.default.svc.cluster.local.", RecordType::AAAA),
        );
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());
        assert_eq!(aaaa.authorities.len(), 1);
        assert_eq!(handler.cache.len(), 3);
    }

    /// What does not come from the index alone is never cached: refused names, errors,
    /// and (with upstreams) forwarded names, which wait.
    #[test]
    fn only_answers_from_the_index_are_cached() {
        let handler = handler(SharedDnsIndex::default(), Vec::new());
        let outside = query(1, "example.com.", RecordType::A);
        assert_eq!(
            ask(&handler, &outside).metadata.response_code,
            ResponseCode::Refused
        );
        let mut chaos = Message::query();
        let mut question = Query::query(
            Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
            RecordType::A,
        );
        question.set_query_class(DNSClass::CH);
        chaos.add_query(question);
        let chaos = chaos.to_vec().unwrap();
        assert_eq!(
            ask(&handler, &chaos).metadata.response_code,
            ResponseCode::Refused
        );
        // A header and a cut question: FORMERR.
        let cut = &query(2, "web.default.svc.cluster.local.", RecordType::A)[..20];
        assert_eq!(
            ask(&handler, cut).metadata.response_code,
            ResponseCode::FormErr
        );
        assert!(handler.cache.is_empty());

        let forwarding = handler_with_upstream();
        let mut out = Vec::new();
        let src = CLIENT.parse().unwrap();
        assert!(matches!(
            forwarding.answer_udp(&outside, src, &mut out),
            Udp::Later(_)
        ));
        assert!(forwarding.cache.is_empty());
    }

    fn handler_with_upstream() -> Handler {
        handler(
            SharedDnsIndex::default(),
            vec!["127.0.0.1:9".parse().unwrap()],
        )
    }
}
