//! Forwarding of names outside `.gstacks` to the host's resolvers.
//!
//! The client's query goes out as it came (EDNS, DO and CD bits included)
//! under a fresh random id from a fresh random port; the first answer whose
//! id and question match is taken, retried over TCP if truncated. The
//! handler relays its rcode and sections as they are.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::LowerName,
};
use hickory_resolver::system_conf::parse_resolv_conf;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
    time::{timeout_at, Instant},
};
use tracing::debug;

use crate::DnsError;

/// How long one upstream server gets to answer before the next is asked.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Queries that may wait for upstream servers at once (each holds a socket);
/// beyond that a forwarded query is answered SERVFAIL at once.
pub const MAX_IN_FLIGHT: usize = 256;

/// glibc's MAXNS: later nameserver lines are ignored by the host too.
const MAX_SERVERS: usize = 3;

/// The resolvers that names outside `.gstacks` are forwarded to.
#[derive(Clone, Debug)]
pub struct Upstream {
    servers: Arc<[SocketAddr]>,
    attempt_timeout: Duration,
    in_flight: Arc<Semaphore>,
}

/// The question a response must repeat to be accepted.
pub(crate) struct Question<'a> {
    pub name: &'a LowerName,
    pub query_type: hickory_proto::rr::RecordType,
    pub query_class: hickory_proto::rr::DNSClass,
}

impl Upstream {
    /// Forwards to `servers` in order (the first that answers wins).
    pub fn new(servers: impl IntoIterator<Item = SocketAddr>) -> Self {
        Upstream {
            servers: servers.into_iter().collect(),
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// No upstream: names outside `.gstacks` get SERVFAIL.
    pub fn none() -> Self {
        Self::new([])
    }

    /// The `nameserver` lines of `/etc/resolv.conf`, port 53.
    pub fn system() -> Result<Self, DnsError> {
        Self::from_resolv_conf(Path::new("/etc/resolv.conf"))
    }

    /// The `nameserver` lines of a resolv.conf file, port 53.
    pub fn from_resolv_conf(path: &Path) -> Result<Self, DnsError> {
        let text = std::fs::read(path).map_err(|source| DnsError::ReadResolvConf {
            path: path.to_path_buf(),
            source,
        })?;
        let no_nameserver = || DnsError::NoNameserver {
            path: path.to_path_buf(),
        };
        let (config, _) = parse_resolv_conf(text).map_err(|_| no_nameserver())?;
        let servers: Vec<SocketAddr> = config
            .name_servers()
            .iter()
            .map(|server| SocketAddr::new(server.ip, 53))
            .filter(|addr| !addr.ip().is_unspecified())
            .take(MAX_SERVERS)
            .collect();
        if servers.is_empty() {
            return Err(no_nameserver());
        }
        Ok(Self::new(servers))
    }

    /// How long each server gets before the next one is asked.
    pub fn with_attempt_timeout(mut self, attempt_timeout: Duration) -> Self {
        self.attempt_timeout = attempt_timeout;
        self
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The same upstream without `addr`: a server must not forward to itself.
    pub(crate) fn without(&self, addr: SocketAddr) -> Self {
        Upstream {
            servers: self
                .servers
                .iter()
                .copied()
                .filter(|s| *s != addr)
                .collect(),
            attempt_timeout: self.attempt_timeout,
            in_flight: self.in_flight.clone(),
        }
    }

    /// Sends the raw client query to each server in turn. An answer with
    /// NOERROR, NXDOMAIN or any rcode other than SERVFAIL/REFUSED/NOTIMP is
    /// returned at once; those three move on to the next server, and the last
    /// of them is returned if nobody does better.
    pub(crate) async fn forward(
        &self,
        query: &[u8],
        question: &Question<'_>,
    ) -> Result<Message, DnsError> {
        if self.servers.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| DnsError::UpstreamBusy {
                limit: MAX_IN_FLIGHT,
            })?;
        let mut last_refusal = None;
        let mut last_error = DnsError::NoUpstream;
        for &server in self.servers.iter() {
            match self.exchange(server, query, question).await {
                Ok(answer)
                    if matches!(
                        answer.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
                    ) =>
                {
                    debug!(%server, rcode = %answer.metadata.response_code, "upstream refused, trying the next");
                    last_refusal = Some(answer);
                }
                Ok(answer) => return Ok(answer),
                Err(error) => {
                    debug!(%error, "upstream attempt failed");
                    last_error = error;
                }
            }
        }
        last_refusal.ok_or(last_error)
    }

    async fn exchange(
        &self,
        server: SocketAddr,
        query: &[u8],
        question: &Question<'_>,
    ) -> Result<Message, DnsError> {
        let deadline = Instant::now() + self.attempt_timeout;
        let timeout_error = || DnsError::UpstreamTimeout {
            server,
            timeout_ms: self.attempt_timeout.as_millis(),
        };
        let id: u16 = rand::random();
        let mut packet = query.to_vec();
        if packet.len() < 12 {
            return Err(DnsError::UpstreamBadResponse {
                server,
                reason: "query shorter than a DNS header".into(),
            });
        }
        packet[..2].copy_from_slice(&id.to_be_bytes());

        match timeout_at(deadline, exchange_udp(server, &packet, id, question)).await {
            Err(_) => Err(timeout_error()),
            Ok(Err(error)) => Err(error),
            Ok(Ok(answer)) if !answer.metadata.truncation => Ok(answer),
            Ok(Ok(_truncated)) => {
                debug!(%server, "upstream answer truncated, retrying over TCP");
                match timeout_at(deadline, exchange_tcp(server, &packet, id, question)).await {
                    Err(_) => Err(timeout_error()),
                    Ok(result) => result,
                }
            }
        }
    }
}

async fn exchange_udp(
    server: SocketAddr,
    packet: &[u8],
    id: u16,
    question: &Question<'_>,
) -> Result<Message, DnsError> {
    let io = |source| DnsError::UpstreamIo { server, source };
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    // Connected: the kernel drops datagrams from any other address.
    socket.connect(server).await.map_err(io)?;
    socket.send(packet).await.map_err(io)?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let len = socket.recv(&mut buf).await.map_err(io)?;
        match check_answer(&buf[..len], id, question) {
            Ok(answer) => return Ok(answer),
            // Not ours (late answer to an earlier query, spoofing attempt):
            // keep waiting until the deadline.
            Err(reason) => debug!(%server, reason, "ignored an upstream datagram"),
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    packet: &[u8],
    id: u16,
    question: &Question<'_>,
) -> Result<Message, DnsError> {
    let io = |source| DnsError::UpstreamIo { server, source };
    let mut stream = TcpStream::connect(server).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let len = u16::try_from(packet.len()).map_err(|_| DnsError::UpstreamBadResponse {
        server,
        reason: "query longer than 65535 bytes".into(),
    })?;
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await.map_err(io)?;
    let len = stream.read_u16().await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.map_err(io)?;
    check_answer(&buf, id, question).map_err(|reason| DnsError::UpstreamBadResponse {
        server,
        reason: reason.into(),
    })
}

/// Accepts only a response to our id that repeats our question.
fn check_answer(bytes: &[u8], id: u16, question: &Question<'_>) -> Result<Message, &'static str> {
    let answer = Message::from_vec(bytes).map_err(|_| "not a DNS message")?;
    if answer.metadata.message_type != MessageType::Response {
        return Err("not a response");
    }
    if answer.metadata.id != id {
        return Err("id does not match the query");
    }
    match answer.queries.as_slice() {
        [q] if LowerName::new(q.name()) == *question.name
            && q.query_type() == question.query_type
            && q.query_class() == question.query_class =>
        {
            Ok(answer)
        }
        _ => Err("question does not match the query"),
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, str::FromStr};

    use hickory_proto::{
        op::{OpCode, Query},
        rr::{DNSClass, Name, RecordType},
    };

    use super::*;

    fn response(id: u16, name: &str, query_type: RecordType) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Response, OpCode::Query);
        message.add_query(Query::query(Name::from_str(name).unwrap(), query_type));
        message.to_vec().unwrap()
    }

    #[test]
    fn answers_must_match_id_and_question() {
        let name = LowerName::new(&Name::from_str("example.com.").unwrap());
        let question = Question {
            name: &name,
            query_type: RecordType::A,
            query_class: DNSClass::IN,
        };
        assert!(check_answer(&response(7, "Example.COM.", RecordType::A), 7, &question).is_ok());
        assert_eq!(
            check_answer(&response(8, "example.com.", RecordType::A), 7, &question).unwrap_err(),
            "id does not match the query"
        );
        assert_eq!(
            check_answer(&response(7, "example.org.", RecordType::A), 7, &question).unwrap_err(),
            "question does not match the query"
        );
        assert_eq!(
            check_answer(&response(7, "example.com.", RecordType::AAAA), 7, &question).unwrap_err(),
            "question does not match the query"
        );
        let mut query = Message::new(7, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(
            Name::from_str("example.com.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            check_answer(&query.to_vec().unwrap(), 7, &question).unwrap_err(),
            "not a response"
        );
        assert_eq!(
            check_answer(&[1, 2, 3], 7, &question).unwrap_err(),
            "not a DNS message"
        );
    }

    #[test]
    fn resolv_conf_gives_port_53_servers_in_order() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "# comment\nsearch example.com\nnameserver 10.0.0.1\nnameserver ::1\noptions edns0\nnameserver 10.0.0.2\nnameserver 10.0.0.3"
        )
        .unwrap();
        let upstream = Upstream::from_resolv_conf(file.path()).unwrap();
        let expected: Vec<SocketAddr> = vec![
            "10.0.0.1:53".parse().unwrap(),
            "[::1]:53".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
        ];
        assert_eq!(upstream.servers(), expected.as_slice());
        let without = upstream.without("[::1]:53".parse().unwrap());
        assert_eq!(without.servers().len(), 2);
    }

    #[test]
    fn resolv_conf_errors_name_the_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "search example.com").unwrap();
        let err = Upstream::from_resolv_conf(file.path()).unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "{} names no usable nameserver",
                file.path().display()
            )),
            "{err}"
        );
        let err = Upstream::from_resolv_conf(Path::new("/nonexistent/resolv.conf")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read resolver configuration /nonexistent/resolv.conf"),
            "{err}"
        );
    }
}
