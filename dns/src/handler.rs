//! The hickory-server `RequestHandler`: `.gstacks` from the live table,
//! everything else relayed from the upstream resolvers.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use hickory_server::{
    net::{
        runtime::{Time, TokioTime},
        xfer::Protocol,
        NetError,
    },
    proto::{
        op::{
            Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode,
            ResponseCode,
        },
        rr::{
            rdata::{A, AAAA, SOA},
            DNSClass, Name, RData, Record, RecordType,
        },
        serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder, Queries},
};
use tokio::net::UdpSocket;
use tracing::debug;

use crate::{
    fast,
    records::{NameState, RecordTable, TableCache},
    upstream::Question,
    Records, Upstream,
};

/// TTL of A/AAAA answers and of negative answers under `.gstacks`: short, so
/// that an alias change reaches clients that cache within seconds.
pub const RECORD_TTL_SECS: u32 = 5;

/// Largest UDP answer we offer over EDNS (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// Counters of one handler (shared by all servers that use it).
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries answered from the record table with addresses.
    pub answered: AtomicU64,
    /// Existing `.gstacks` names asked for a type they do not hold.
    pub no_data: AtomicU64,
    /// Unknown names under `.gstacks`.
    pub nx_domain: AtomicU64,
    /// Queries relayed from an upstream server.
    pub forwarded: AtomicU64,
    /// Forwarded queries that no upstream answered (SERVFAIL).
    pub upstream_failed: AtomicU64,
    /// Queries refused as malformed or unsupported (FORMERR, NOTIMP,
    /// REFUSED, BADVERS): the peer misbehaved.
    pub rejected: AtomicU64,
}

impl DnsStats {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Answers `<alias>.<network>.gstacks` from [`Records`] and forwards every
/// other name to [`Upstream`]. Owns no sockets: [`crate::DnsServer`] (or any
/// hickory `Server`) feeds it requests.
#[derive(Clone)]
pub struct DnsHandler {
    records: Records,
    upstream: Upstream,
    stats: Arc<DnsStats>,
}

impl DnsHandler {
    pub fn new(records: Records, upstream: Upstream) -> Self {
        DnsHandler {
            records,
            upstream,
            stats: Arc::new(DnsStats::default()),
        }
    }

    pub fn records(&self) -> &Records {
        &self.records
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn stats(&self) -> &Arc<DnsStats> {
        &self.stats
    }

    pub(crate) fn with_upstream(&self, upstream: Upstream) -> Self {
        DnsHandler {
            records: self.records.clone(),
            upstream,
            stats: self.stats.clone(),
        }
    }

    /// Answers one raw UDP query without a socket, exactly as
    /// [`crate::DnsServer`] does (the fast path, else the hickory path):
    /// `None` where the server sends nothing (fewer than 12 bytes, or a
    /// response). For the fuzz target and tests.
    pub async fn answer_datagram(&self, query: Vec<u8>, src: SocketAddr) -> Option<Vec<u8>> {
        let mut fast = FastPath::new(self);
        if let Some(answer) = fast.answer(&query) {
            return Some(answer.to_vec());
        }
        self.answer_datagram_hickory(query, src).await
    }

    /// As [`Self::answer_datagram`] through the hickory path only, never the
    /// fast path: what the fast path's answers are compared with.
    pub async fn answer_datagram_hickory(
        &self,
        query: Vec<u8>,
        src: SocketAddr,
    ) -> Option<Vec<u8>> {
        let buffer = AnswerBuffer::default();
        self.serve_datagram(query, src, buffer.clone()).await;
        let answer = buffer
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        answer
    }

    /// One UDP datagram through hickory, as hickory's `Server` handles it:
    /// under 12 bytes: dropped; a header but no parseable message: FORMERR
    /// without a question; a response: dropped; else [`Self::handle_request`].
    pub(crate) async fn serve_datagram<R: ResponseHandler>(
        &self,
        query: Vec<u8>,
        src: SocketAddr,
        response_handle: R,
    ) {
        let header = match Header::read(&mut BinDecoder::new(&query)) {
            Ok(header) => header,
            Err(_) => return,
        };
        let request = match Request::from_bytes(query, src, Protocol::Udp) {
            Ok(request) => request,
            Err(error) => {
                DnsStats::count(&self.stats.rejected);
                debug!(%src, id = header.metadata.id, %error, "DNS query rejected: cannot parse it");
                let Ok(queries) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
                    return;
                };
                let response = MessageResponseBuilder::new(&queries, None)
                    .error_msg(&header.metadata, ResponseCode::FormErr);
                let mut response_handle = response_handle;
                if let Err(error) = response_handle.send_response(response).await {
                    debug!(%error, %src, "cannot send a DNS error answer");
                }
                return;
            }
        };
        if request.metadata.message_type == MessageType::Response {
            return;
        }
        self.handle_request::<_, TokioTime>(&request, response_handle)
            .await;
    }

    fn reject(&self, code: ResponseCode, why: &str, request: &Request) {
        DnsStats::count(&self.stats.rejected);
        debug!(src = %request.src(), id = request.metadata.id, %code, why, "DNS query rejected");
    }

    /// The local answer for a name under `.gstacks`.
    fn answer_locally(&self, table: &RecordTable, query: &LowerQuery) -> LocalAnswer {
        let state = table.state(query.name());
        let (rcode, answers) = match state {
            NameState::Unknown => {
                DnsStats::count(&self.stats.nx_domain);
                (ResponseCode::NXDomain, Vec::new())
            }
            NameState::Interior | NameState::Alias(_) => {
                let owner = query.original().name().clone();
                let mut answers = Vec::with_capacity(2);
                let query_type = query.query_type();
                if let NameState::Alias(addrs) = state {
                    if let (RecordType::A | RecordType::ANY, Some(ipv4)) = (query_type, addrs.ipv4)
                    {
                        answers.push(Record::from_rdata(
                            owner.clone(),
                            RECORD_TTL_SECS,
                            RData::A(A(ipv4)),
                        ));
                    }
                    if let (RecordType::AAAA | RecordType::ANY, Some(ipv6)) =
                        (query_type, addrs.ipv6)
                    {
                        answers.push(Record::from_rdata(
                            owner.clone(),
                            RECORD_TTL_SECS,
                            RData::AAAA(AAAA(ipv6)),
                        ));
                    }
                }
                if query.name() == table.apex() && query_type == RecordType::SOA {
                    answers.push(soa_record(table));
                }
                if answers.is_empty() {
                    DnsStats::count(&self.stats.no_data);
                } else {
                    DnsStats::count(&self.stats.answered);
                }
                (ResponseCode::NoError, answers)
            }
        };
        // Negative answers carry the zone's SOA so resolvers cache them for
        // RECORD_TTL_SECS only (RFC 2308).
        let soa = if answers.is_empty() {
            vec![soa_record(table)]
        } else {
            Vec::new()
        };
        LocalAnswer {
            rcode,
            answers,
            soa,
        }
    }

    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        query: &LowerQuery,
        response_edns: Option<&Edns>,
        mut response_handle: R,
    ) -> ResponseInfo {
        let question = Question {
            name: query.name(),
            query_type: query.query_type(),
            query_class: query.query_class(),
        };
        let answer: Message = match self.upstream.forward(request.as_slice(), &question).await {
            Ok(answer) => answer,
            Err(error) => {
                DnsStats::count(&self.stats.upstream_failed);
                debug!(%error, name = %query.name(), "forwarding failed, answering SERVFAIL");
                return send_error(
                    request,
                    ResponseCode::ServFail,
                    response_edns,
                    response_handle,
                )
                .await;
            }
        };
        DnsStats::count(&self.stats.forwarded);

        // The upstream's header with the client's id and query bits.
        let mut metadata = answer.metadata;
        metadata.id = request.metadata.id;
        metadata.recursion_desired = request.metadata.recursion_desired;
        metadata.checking_disabled = request.metadata.checking_disabled;
        metadata.truncation = false;

        // The upstream's OPT (options, DO bit) but our payload size; none if
        // the client sent none.
        let edns = match (response_edns, &answer.edns) {
            (Some(ours), Some(theirs)) => {
                let mut edns = theirs.clone();
                edns.set_max_payload(ours.max_payload());
                edns.set_version(0);
                Some(edns)
            }
            (Some(ours), None) => Some(ours.clone()),
            (None, _) => None,
        };
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answer.answers.iter(),
            answer.authorities.iter(),
            std::iter::empty(),
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, src = %request.src(), "cannot send the relayed DNS answer");
                serve_failed(request)
            }
        }
    }
}

/// The UDP fast path of one receive loop: its buffers and its copy of the
/// table (see [`crate::fast`]).
pub(crate) struct FastPath {
    cache: TableCache,
    stats: Arc<DnsStats>,
    recursion_available: bool,
    name: [u8; 255],
    answer: Vec<u8>,
}

impl FastPath {
    pub(crate) fn new(handler: &DnsHandler) -> Self {
        FastPath {
            cache: TableCache::new(handler.records()),
            stats: handler.stats.clone(),
            recursion_available: !handler.upstream.is_empty(),
            name: [0; 255],
            answer: Vec::with_capacity(512),
        }
    }

    /// The answer to `query` if the fast path knows it; `None`: ask the
    /// hickory path.
    pub(crate) fn answer(&mut self, query: &[u8]) -> Option<&[u8]> {
        let parsed = fast::parse(query, &mut self.name)?;
        let answered = fast::answer(
            query,
            &parsed,
            &self.name,
            self.cache.current(),
            self.recursion_available,
            EDNS_PAYLOAD,
            &mut self.answer,
        );
        if !answered {
            return None;
        }
        DnsStats::count(&self.stats.answered);
        Some(&self.answer)
    }
}

/// A `ResponseHandler` that sends the answer on a UDP socket, encoded as
/// hickory's own UDP `ResponseHandle` does.
#[derive(Clone)]
pub(crate) struct UdpReply {
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_udp(response)?;
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

/// Encodes an answer for UDP as hickory's `MessageResponse::encode` does:
/// at most the answer's OPT payload size (512 without OPT), truncated with TC
/// beyond it; an answer that cannot be encoded becomes a bare SERVFAIL.
fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let id = response.metadata().id;
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(response.edns().map_or(512, Edns::max_payload));
    let error = match response.destructive_emit(&mut encoder) {
        Ok(info) => return Ok((info, bytes)),
        Err(error) => error,
    };
    debug!(%error, id, "cannot encode a DNS answer, sending SERVFAIL");
    bytes.clear();
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(512);
    let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
    metadata.response_code = ResponseCode::ServFail;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    header.emit(&mut encoder)?;
    Ok((ResponseInfo::from(header), bytes))
}

/// A `ResponseHandler` that keeps the encoded answer instead of sending it.
#[derive(Clone, Default)]
struct AnswerBuffer(Arc<Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for AnswerBuffer {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_udp(response)?;
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(bytes);
        Ok(info)
    }
}

struct LocalAnswer {
    rcode: ResponseCode,
    answers: Vec<Record>,
    soa: Vec<Record>,
}

fn soa_record(table: &RecordTable) -> Record {
    let apex = Name::from(table.apex().clone());
    let mname = Name::from_ascii("ns")
        .and_then(|ns| ns.append_domain(&apex))
        .unwrap_or_else(|_| apex.clone());
    let rname = Name::from_ascii("hostmaster")
        .and_then(|host| host.append_domain(&apex))
        .unwrap_or_else(|_| apex.clone());
    let ttl = RECORD_TTL_SECS;
    let soa = SOA::new(
        mname,
        rname,
        table.serial(),
        ttl as i32,
        ttl as i32,
        ttl as i32,
        ttl,
    );
    Record::from_rdata(apex, ttl, RData::SOA(soa))
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let response_edns = match &request.edns {
            Some(request_edns) => {
                let mut edns = Edns::new();
                edns.set_max_payload(request_edns.max_payload().clamp(512, EDNS_PAYLOAD));
                edns.set_version(0);
                edns.set_dnssec_ok(request_edns.flags().dnssec_ok);
                if request_edns.version() > 0 {
                    self.reject(ResponseCode::BADVERS, "EDNS version above 0", request);
                    return send_error(
                        request,
                        ResponseCode::BADVERS,
                        Some(&edns),
                        response_handle,
                    )
                    .await;
                }
                Some(edns)
            }
            None => None,
        };
        let response_edns = response_edns.as_ref();

        if request.metadata.op_code != OpCode::Query {
            self.reject(ResponseCode::NotImp, "opcode other than QUERY", request);
            return send_error(
                request,
                ResponseCode::NotImp,
                response_edns,
                response_handle,
            )
            .await;
        }
        let query = match request.queries.queries() {
            [query] => query,
            queries => {
                let why = if queries.is_empty() {
                    "no question"
                } else {
                    "more than one question"
                };
                self.reject(ResponseCode::FormErr, why, request);
                return send_error(
                    request,
                    ResponseCode::FormErr,
                    response_edns,
                    response_handle,
                )
                .await;
            }
        };
        match query.query_type() {
            RecordType::OPT => {
                self.reject(ResponseCode::FormErr, "OPT as question type", request);
                return send_error(
                    request,
                    ResponseCode::FormErr,
                    response_edns,
                    response_handle,
                )
                .await;
            }
            RecordType::AXFR | RecordType::IXFR => {
                self.reject(ResponseCode::Refused, "zone transfer", request);
                return send_error(
                    request,
                    ResponseCode::Refused,
                    response_edns,
                    response_handle,
                )
                .await;
            }
            _ => {}
        }

        let table = self.records.snapshot();
        if !table.is_ours(query.name()) {
            return self
                .forward(request, query, response_edns, response_handle)
                .await;
        }
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            self.reject(
                ResponseCode::Refused,
                "class other than IN under .gstacks",
                request,
            );
            return send_error(
                request,
                ResponseCode::Refused,
                response_edns,
                response_handle,
            )
            .await;
        }

        let answer = self.answer_locally(&table, query);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = !self.upstream.is_empty();
        metadata.response_code = answer.rcode;
        let response = MessageResponseBuilder::new(&request.queries, response_edns).build(
            metadata,
            answer.answers.iter(),
            std::iter::empty(),
            answer.soa.iter(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, src = %request.src(), "cannot send the DNS answer");
                serve_failed(request)
            }
        }
    }
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    code: ResponseCode,
    edns: Option<&Edns>,
    mut response_handle: R,
) -> ResponseInfo {
    let response =
        MessageResponseBuilder::new(&request.queries, edns).error_msg(&request.metadata, code);
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            debug!(%error, src = %request.src(), "cannot send a DNS error answer");
            serve_failed(request)
        }
    }
}

fn serve_failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        str::FromStr,
    };

    use hickory_server::proto::op::Query;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;
    use crate::ListenerAddrs;

    const API_V4: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
    const API_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const DB_V4: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 2);

    fn handler() -> DnsHandler {
        let mut table = RecordTable::new();
        table
            .insert("dev", "api", ListenerAddrs::v4(API_V4).with_ipv6(API_V6))
            .unwrap();
        table.insert("dev", "db", ListenerAddrs::v4(DB_V4)).unwrap();
        DnsHandler::new(Records::new(table), Upstream::none())
    }

    fn query(name: &str, query_type: RecordType) -> Message {
        let mut message = Message::new(4242, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), query_type));
        message
    }

    async fn ask_raw(handler: &DnsHandler, bytes: Vec<u8>) -> Option<Message> {
        let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let answer = handler.answer_datagram(bytes, src).await?;
        Some(Message::from_vec(&answer).expect("the answer parses"))
    }

    async fn ask(handler: &DnsHandler, message: &Message) -> Message {
        let answer = ask_raw(handler, message.to_vec().unwrap()).await.unwrap();
        assert_eq!(answer.metadata.id, message.metadata.id);
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        answer
    }

    fn addresses(answer: &Message) -> Vec<String> {
        answer
            .answers
            .iter()
            .map(|record| record.data.to_string())
            .collect()
    }

    #[tokio::test]
    async fn aliases_answer_a_and_aaaa_with_a_short_ttl() {
        let handler = handler();
        let answer = ask(&handler, &query("API.dev.gstacks.", RecordType::A)).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.metadata.authoritative);
        assert!(answer.metadata.recursion_desired);
        assert_eq!(addresses(&answer), vec![API_V4.to_string()]);
        let record = &answer.answers[0];
        assert_eq!(record.ttl, RECORD_TTL_SECS);
        assert_eq!(record.name.to_string(), "API.dev.gstacks.");

        let answer = ask(&handler, &query("api.dev.gstacks.", RecordType::AAAA)).await;
        assert_eq!(addresses(&answer), vec![API_V6.to_string()]);

        let answer = ask(&handler, &query("api.dev.gstacks.", RecordType::ANY)).await;
        assert_eq!(
            addresses(&answer),
            vec![API_V4.to_string(), API_V6.to_string()]
        );
        assert_eq!(handler.stats().answered.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn existing_names_without_the_type_get_nodata_with_the_soa() {
        let handler = handler();
        for (name, query_type) in [
            ("db.dev.gstacks.", RecordType::AAAA),
            ("api.dev.gstacks.", RecordType::MX),
            ("api.dev.gstacks.", RecordType::TXT),
            ("dev.gstacks.", RecordType::A),
            ("gstacks.", RecordType::A),
        ] {
            let answer = ask(&handler, &query(name, query_type)).await;
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::NoError,
                "{name}"
            );
            assert!(answer.answers.is_empty(), "{name} {query_type}");
            assert!(answer.metadata.authoritative);
            assert_eq!(answer.authorities.len(), 1);
            assert_eq!(answer.authorities[0].record_type(), RecordType::SOA);
            assert_eq!(answer.authorities[0].ttl, RECORD_TTL_SECS);
        }
        assert_eq!(handler.stats().no_data.load(Ordering::Relaxed), 5);

        let answer = ask(&handler, &query("gstacks.", RecordType::SOA)).await;
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(answer.answers[0].record_type(), RecordType::SOA);
    }

    #[tokio::test]
    async fn unknown_names_under_gstacks_get_an_authoritative_nxdomain() {
        let handler = handler();
        for name in [
            "web.dev.gstacks.",
            "api.prod.gstacks.",
            "prod.gstacks.",
            "x.api.dev.gstacks.",
        ] {
            let answer = ask(&handler, &query(name, RecordType::A)).await;
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::NXDomain,
                "{name}"
            );
            assert!(answer.metadata.authoritative);
            assert!(answer.answers.is_empty());
            assert_eq!(answer.authorities[0].record_type(), RecordType::SOA);
        }
        assert_eq!(handler.stats().nx_domain.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_replaced_table_is_what_the_next_query_sees() {
        let handler = handler();
        let mut table = RecordTable::new();
        table
            .insert(
                "dev",
                "web",
                ListenerAddrs::v4(Ipv4Addr::new(127, 77, 0, 9)),
            )
            .unwrap();
        handler.records().replace(table);
        let answer = ask(&handler, &query("web.dev.gstacks.", RecordType::A)).await;
        assert_eq!(addresses(&answer), vec!["127.77.0.9".to_string()]);
        let answer = ask(&handler, &query("api.dev.gstacks.", RecordType::A)).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    }

    #[tokio::test]
    async fn other_names_without_upstream_get_servfail() {
        let handler = handler();
        let answer = ask(&handler, &query("example.com.", RecordType::A)).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert!(!answer.metadata.authoritative);
        assert_eq!(handler.stats().upstream_failed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn odd_queries_get_formerr_notimp_refused_or_badvers() {
        let handler = handler();

        let mut empty = query("api.dev.gstacks.", RecordType::A);
        empty.queries.clear();
        let answer = ask(&handler, &empty).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);

        let mut two = query("api.dev.gstacks.", RecordType::A);
        two.add_query(Query::query(
            Name::from_str("db.dev.gstacks.").unwrap(),
            RecordType::A,
        ));
        let answer = ask(&handler, &two).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
        assert!(answer.answers.is_empty());

        for op_code in [OpCode::Status, OpCode::Notify, OpCode::Update] {
            let mut message = query("api.dev.gstacks.", RecordType::A);
            message.metadata.op_code = op_code;
            let answer = ask(&handler, &message).await;
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::NotImp,
                "{op_code:?}"
            );
        }

        let answer = ask(&handler, &query("api.dev.gstacks.", RecordType::OPT)).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
        for query_type in [RecordType::AXFR, RecordType::IXFR] {
            let answer = ask(&handler, &query("gstacks.", query_type)).await;
            assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
            let answer = ask(&handler, &query("example.com.", query_type)).await;
            assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
        }

        let mut chaos = query("api.dev.gstacks.", RecordType::TXT);
        let chaos_query = chaos.queries[0]
            .clone()
            .set_query_class(DNSClass::CH)
            .clone();
        chaos.queries = vec![chaos_query];
        let answer = ask(&handler, &chaos).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::Refused);

        let mut future_edns = query("api.dev.gstacks.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_version(1);
        future_edns.set_edns(edns);
        let answer = ask(&handler, &future_edns).await;
        // 16 is BADVERS in an OPT (the decoder names it BADSIG, same value).
        assert_eq!(u16::from(answer.metadata.response_code), 16);
        assert!(answer.edns.is_some());

        assert_eq!(handler.stats().rejected.load(Ordering::Relaxed), 12);
        assert_eq!(handler.stats().answered.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn edns_queries_get_an_opt_record_back() {
        let handler = handler();
        let mut message = query("api.dev.gstacks.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        edns.set_dnssec_ok(true);
        message.set_edns(edns);
        let answer = ask(&handler, &message).await;
        let edns = answer.edns.as_ref().expect("an OPT record");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        assert_eq!(edns.version(), 0);
        assert_eq!(addresses(&answer), vec![API_V4.to_string()]);
    }

    /// A query in wire form with the name's case as given: `flags` is the
    /// header's third and fourth byte, `opt` an OPT record (ARCOUNT 1).
    fn wire(name: &str, qtype: u16, flags: u16, opt: Option<&[u8]>) -> Vec<u8> {
        let mut packet = vec![0x5a, 0xa5];
        packet.extend_from_slice(&flags.to_be_bytes());
        packet.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(opt.is_some())]);
        for label in name.split('.').filter(|label| !label.is_empty()) {
            packet.push(label.len() as u8);
            packet.extend_from_slice(label.as_bytes());
        }
        packet.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
        packet.extend_from_slice(opt.unwrap_or_default());
        packet
    }

    /// An OPT record: payload size, extended rcode, version, flags,
    /// options.
    fn opt(payload: u16, extended_rcode: u8, version: u8, flags: u16, options: &[u8]) -> Vec<u8> {
        let mut record = vec![0, 0, 41];
        record.extend_from_slice(&payload.to_be_bytes());
        record.extend_from_slice(&[extended_rcode, version]);
        record.extend_from_slice(&flags.to_be_bytes());
        record.extend_from_slice(&(options.len() as u16).to_be_bytes());
        record.extend_from_slice(options);
        record
    }

    fn handler_with_v6_only_alias(upstream: Upstream) -> DnsHandler {
        let mut table = RecordTable::new();
        table
            .insert("dev", "api", ListenerAddrs::v4(API_V4).with_ipv6(API_V6))
            .unwrap();
        table.insert("dev", "db", ListenerAddrs::v4(DB_V4)).unwrap();
        table
            .insert("dev", "six", ListenerAddrs::v6(API_V6))
            .unwrap();
        DnsHandler::new(Records::new(table), upstream)
    }

    /// The server's answer (fast path first) and the hickory path's answer
    /// to the same bytes, and whether the fast path answered.
    async fn both_paths(handler: &DnsHandler, packet: &[u8]) -> (bool, Option<Vec<u8>>) {
        let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let fast = FastPath::new(handler).answer(packet).map(<[u8]>::to_vec);
        let served = handler.answer_datagram(packet.to_vec(), src).await;
        let hickory = handler.answer_datagram_hickory(packet.to_vec(), src).await;
        if let Some(fast) = &fast {
            assert_eq!(
                Some(fast),
                hickory.as_ref(),
                "fast path and hickory differ for {packet:02x?}"
            );
        }
        assert_eq!(served, hickory, "served answer differs for {packet:02x?}");
        (fast.is_some(), hickory)
    }

    #[tokio::test]
    async fn the_fast_path_answers_byte_for_byte_as_the_hickory_path() {
        // With an upstream (RA set) and without; the upstream is never
        // asked: every name here is under .gstacks or the fast path declines
        // before forwarding is considered... except example.com, which the
        // unreachable upstream answers with SERVFAIL.
        let unreachable = Upstream::new(["127.0.0.1:9".parse().unwrap()])
            .with_attempt_timeout(std::time::Duration::from_millis(50));
        for handler in [
            handler_with_v6_only_alias(Upstream::none()),
            handler_with_v6_only_alias(unreachable),
        ] {
            let mut fast_answers = 0;
            let options = opt(1232, 0, 0, 0, &[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
            let opts: Vec<Option<Vec<u8>>> = vec![
                None,
                Some(opt(0, 0, 0, 0, &[])),
                Some(opt(511, 0, 0, 0, &[])),
                Some(opt(512, 0, 0, 0x8000, &[])),
                Some(opt(1232, 0, 0, 0, &[])),
                Some(opt(1233, 0, 0, 0x8000, &[])),
                Some(opt(4096, 0, 0, 0x7fff, &[])),
                Some(opt(65535, 0, 0, 0xffff, &[])),
                Some(opt(4096, 1, 0, 0, &[])),
                Some(opt(4096, 0, 1, 0, &[])),
                Some(options),
            ];
            for name in [
                "api.dev.gstacks",
                "API.DEV.GSTACKS",
                "aPi.dEv.GsTaCkS",
                "db.dev.gstacks",
                "six.dev.gstacks",
                "web.dev.gstacks",
                "dev.gstacks",
                "gstacks",
                "x.api.dev.gstacks",
                "api.dev.gstacks.example",
            ] {
                for qtype in [1, 28, 255, 15, 6] {
                    for opt in &opts {
                        let packet = wire(name, qtype, 0x0100, opt.as_deref());
                        if both_paths(&handler, &packet).await.0 {
                            fast_answers += 1;
                        }
                    }
                }
            }
            // api A, api AAAA, db A, six AAAA (three case variants of api),
            // each without OPT and with the 7 OPT records the fast path
            // takes (version 0, no extended rcode, no options).
            assert_eq!(fast_answers, (3 * 2 + 2) * 8);
        }
    }

    #[tokio::test]
    async fn the_fast_path_copies_header_flags_as_the_hickory_path() {
        let handler = handler_with_v6_only_alias(Upstream::none());
        let edns = opt(4096, 0, 0, 0x8000, &[]);
        let mut fast_answers = 0;
        for flags in 0..=u16::MAX {
            for opt in [None, Some(edns.as_slice())] {
                let packet = wire("Api.dev.gstacks", 1, flags, opt);
                let (fast, hickory) = both_paths(&handler, &packet).await;
                if fast {
                    fast_answers += 1;
                }
                // Responses are dropped, never answered.
                if flags & 0x8000 != 0 {
                    assert_eq!(hickory, None);
                }
            }
        }
        // QR 0 and opcode QUERY leave 11 bits: 2^11 flag words, each with
        // and without OPT.
        assert_eq!(fast_answers, 2 * 2048);
    }

    #[tokio::test]
    async fn malformed_queries_are_refused_or_ignored_by_both_paths() {
        let handler = handler_with_v6_only_alias(Upstream::none());
        let good = wire("api.dev.gstacks", 1, 0x0100, None);
        // Truncated anywhere: under 12 bytes nothing, else FORMERR.
        for len in 0..good.len() {
            let (fast, answer) = both_paths(&handler, &good[..len]).await;
            assert!(!fast);
            match answer {
                None => assert!(len < 12, "no answer to {len} bytes"),
                Some(answer) => {
                    assert!(len >= 12);
                    let answer = Message::from_vec(&answer).unwrap();
                    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
                    assert!(answer.queries.is_empty());
                }
            }
        }

        let formerr = |packet: Vec<u8>, why: &'static str| async move {
            let handler = handler_with_v6_only_alias(Upstream::none());
            let (fast, answer) = both_paths(&handler, &packet).await;
            assert!(!fast, "{why}");
            let answer = Message::from_vec(&answer.expect(why)).unwrap();
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::FormErr,
                "{why}"
            );
            assert_eq!(answer.metadata.id, 0x5aa5, "{why}");
        };
        // A name that points at itself, and two names pointing at each other.
        let mut looped = good[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        formerr(looped, "pointer loop").await;
        let mut mutual = good[..12].to_vec();
        mutual.extend_from_slice(&[1, b'a', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1]);
        formerr(mutual, "mutual pointers").await;
        // A name of 257 bytes in wire form.
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{label}");
        formerr(wire(&long, 1, 0x0100, None), "oversized name").await;
        // A label of 64 bytes (a reserved label type).
        formerr(wire(&"a".repeat(64), 1, 0x0100, None), "oversized label").await;
        // QDCOUNT 0 and 2 with one question in the bytes.
        let mut none = good.clone();
        none[5] = 0;
        formerr(none, "QDCOUNT 0 with a question").await;
        let mut two = good.clone();
        two[5] = 2;
        formerr(two, "QDCOUNT 2 with one question").await;
        // QDCOUNT 0 and nothing else: a header only, parsed, no question.
        let mut empty = good[..12].to_vec();
        empty[5] = 0;
        formerr(empty, "no question").await;
        // Two whole questions.
        let mut two = good.clone();
        two[5] = 2;
        two.extend_from_slice(&good[12..]);
        formerr(two, "two questions").await;
    }

    /// Random and mutated packets: whatever hickory's parser lets through,
    /// the handler answers with a well-formed message and never panics.
    #[tokio::test]
    async fn mutated_packets_never_panic_and_always_get_a_parseable_answer() {
        let handler = handler();
        let mut rng = StdRng::seed_from_u64(0x9_57ac);
        let mut seeds = Vec::new();
        for (name, query_type) in [
            ("api.dev.gstacks.", RecordType::A),
            ("db.dev.gstacks.", RecordType::AAAA),
            ("nope.gstacks.", RecordType::ANY),
        ] {
            let mut message = query(name, query_type);
            seeds.push(message.to_vec().unwrap());
            message.set_edns(Edns::new());
            seeds.push(message.to_vec().unwrap());
        }
        let mut handled = 0;
        for round in 0..20_000 {
            let mut packet = seeds[round % seeds.len()].clone();
            match round % 4 {
                0 => {
                    let len = rng.random_range(0..64);
                    packet = (0..len).map(|_| rng.random()).collect();
                }
                1 => packet.truncate(rng.random_range(0..packet.len())),
                _ => {
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..packet.len());
                        packet[at] = rng.random();
                    }
                }
            }
            if ask_raw(&handler, packet).await.is_some() {
                handled += 1;
            }
        }
        // Most mutations of the header and question still parse.
        assert!(
            handled > 2_000,
            "only {handled} packets reached the handler"
        );
    }
}
