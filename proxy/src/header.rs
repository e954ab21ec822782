//! The mesh header: what the source agent writes first on a mesh TCP
//! connection to the target agent, and the target's one-byte answer.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! "GSMH" version:u8 body_len:u16 body
//! body = network:label alias:label port:u16 flags:u8 [sandbox_id:str]
//!        n_aliases:u8 alias:label * n  n_tags:u8 tag:str * n
//! label, str = len:u8 bytes     (1-63 bytes)
//! flags: bit 0 = local node, bit 1 = sandbox id present
//! ```
//!
//! The whole header is at most [`MAX_HEADER`] bytes. The answer is one status
//! byte (0 accepted, 1 denied, 2 target unreachable), followed for the last two
//! by `len:u16 reason` (at most [`MAX_REASON`] bytes of UTF-8).
//!
//! Version 2: the target sends a refusal at once, but "accepted" only just
//! before the sandbox's first byte (or its EOF). The source therefore does
//! not wait a mesh round trip before forwarding its client's first bytes;
//! it reads the answer as the first bytes of the stream
//! ([`crate::MeshStream`]).

use policy::Source;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ProxyError;

pub const MAGIC: [u8; 4] = *b"GSMH";
pub const VERSION: u8 = 2;
/// Upper bound of an encoded header, prefix included.
pub const MAX_HEADER: usize = 4096;
/// Upper bound of the reason text in an answer.
pub const MAX_REASON: usize = 1024;
/// Longest network, alias, sandbox id or tag.
pub const MAX_NAME: usize = 63;

const PREFIX: usize = 4 + 1 + 2;
const FLAG_LOCAL: u8 = 1;
const FLAG_SANDBOX: u8 = 2;

/// Which alias and port of which network the source wants, and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshHeader {
    pub network: String,
    pub alias: String,
    pub port: u16,
    pub source: Source,
}

/// The target agent's answer to a [`MeshHeader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Accepted,
    /// Policy (or an unknown network/alias) refused the connection.
    Denied {
        reason: String,
    },
    /// Allowed, but the target could not connect to the sandbox.
    Unreachable {
        reason: String,
    },
}

/// Sandbox ids and tags: 1-63 bytes of ASCII letters, digits, `-`, `_`, `.`, `:`.
fn validate_token(field: &'static str, value: &str) -> Result<(), ProxyError> {
    let why = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_NAME {
        Some("it is longer than 63 bytes")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        Some("only ASCII letters, digits, `-`, `_`, `.` and `:` are allowed")
    } else {
        None
    };
    match why {
        Some(why) => Err(ProxyError::BadField {
            field,
            value: value.escape_debug().take(80).collect(),
            why,
        }),
        None => Ok(()),
    }
}

impl MeshHeader {
    /// Checks every field the way [`MeshHeader::decode`] does.
    pub fn validate(&self) -> Result<(), ProxyError> {
        policy::validate_label("network", &self.network)?;
        policy::validate_label("alias", &self.alias)?;
        if self.port == 0 {
            return Err(ProxyError::BadField {
                field: "port",
                value: "0".into(),
                why: "ports are 1-65535",
            });
        }
        if let Some(id) = &self.source.sandbox_id {
            validate_token("source sandbox id", id)?;
        }
        if self.source.aliases.len() > usize::from(u8::MAX) {
            return Err(ProxyError::TooMany {
                field: "source aliases",
                count: self.source.aliases.len(),
            });
        }
        if self.source.tags.len() > usize::from(u8::MAX) {
            return Err(ProxyError::TooMany {
                field: "source tags",
                count: self.source.tags.len(),
            });
        }
        for alias in &self.source.aliases {
            policy::validate_label("source alias", alias)?;
        }
        for tag in &self.source.tags {
            validate_token("source tag", tag)?;
        }
        Ok(())
    }

    /// The header on the wire; refuses invalid fields and headers over
    /// [`MAX_HEADER`].
    pub fn encode(&self) -> Result<Vec<u8>, ProxyError> {
        self.validate()?;
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0, 0]);
        let put = |out: &mut Vec<u8>, s: &str| {
            // Validated above: 1-63 bytes.
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        };
        put(&mut out, &self.network);
        put(&mut out, &self.alias);
        out.extend_from_slice(&self.port.to_be_bytes());
        let mut flags = 0;
        if self.source.local {
            flags |= FLAG_LOCAL;
        }
        if self.source.sandbox_id.is_some() {
            flags |= FLAG_SANDBOX;
        }
        out.push(flags);
        if let Some(id) = &self.source.sandbox_id {
            put(&mut out, id);
        }
        out.push(self.source.aliases.len() as u8);
        for alias in &self.source.aliases {
            put(&mut out, alias);
        }
        out.push(self.source.tags.len() as u8);
        for tag in &self.source.tags {
            put(&mut out, tag);
        }
        if out.len() > MAX_HEADER {
            return Err(ProxyError::HeaderTooLong { len: out.len() });
        }
        let body = (out.len() - PREFIX) as u16;
        out[5..7].copy_from_slice(&body.to_be_bytes());
        Ok(out)
    }

    /// Reads exactly one header from `reader` (never more bytes than the
    /// header has). Applies no deadline: wrap it in a timeout.
    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, ProxyError> {
        let mut prefix = [0u8; PREFIX];
        read_exact(reader, &mut prefix, "header prefix").await?;
        let magic = [prefix[0], prefix[1], prefix[2], prefix[3]];
        if magic != MAGIC {
            return Err(ProxyError::BadMagic(magic));
        }
        if prefix[4] != VERSION {
            return Err(ProxyError::UnsupportedVersion(prefix[4]));
        }
        let len = usize::from(u16::from_be_bytes([prefix[5], prefix[6]]));
        if PREFIX + len > MAX_HEADER {
            return Err(ProxyError::HeaderTooLong { len: PREFIX + len });
        }
        let mut body = vec![0u8; len];
        read_exact(reader, &mut body, "header body").await?;
        Self::decode_body(&body)
    }

    fn decode_body(body: &[u8]) -> Result<Self, ProxyError> {
        let mut cur = Cursor { rest: body };
        let network = cur.string("network")?;
        policy::validate_label("network", &network)?;
        let alias = cur.string("alias")?;
        policy::validate_label("alias", &alias)?;
        let port = u16::from_be_bytes([cur.byte("port")?, cur.byte("port")?]);
        let flags = cur.byte("source flags")?;
        if flags & !(FLAG_LOCAL | FLAG_SANDBOX) != 0 {
            return Err(ProxyError::BadField {
                field: "source flags",
                value: format!("{flags:#04x}"),
                why: "unknown flag bits are set",
            });
        }
        let sandbox_id = if flags & FLAG_SANDBOX != 0 {
            Some(cur.string("source sandbox id")?)
        } else {
            None
        };
        let n = cur.byte("source alias count")?;
        let mut aliases = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            aliases.push(cur.string("source alias")?);
        }
        let n = cur.byte("source tag count")?;
        let mut tags = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            tags.push(cur.string("source tag")?);
        }
        if !cur.rest.is_empty() {
            return Err(ProxyError::TrailingBytes(cur.rest.len()));
        }
        let header = MeshHeader {
            network,
            alias,
            port,
            source: Source {
                local: flags & FLAG_LOCAL != 0,
                sandbox_id,
                aliases,
                tags,
            },
        };
        header.validate()?;
        Ok(header)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let (status, reason) = match self {
            Response::Accepted => return vec![0],
            Response::Denied { reason } => (1, reason),
            Response::Unreachable { reason } => (2, reason),
        };
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = Vec::with_capacity(3 + end);
        out.push(status);
        out.extend_from_slice(&(end as u16).to_be_bytes());
        out.extend_from_slice(&reason.as_bytes()[..end]);
        out
    }

    pub async fn write_to<W: AsyncWrite + Unpin>(&self, writer: &mut W) -> Result<(), ProxyError> {
        writer.write_all(&self.encode()).await?;
        writer.flush().await?;
        Ok(())
    }

    /// How many bytes the answer that starts with `prefix` has in all: 1
    /// until the status byte is known, then 1 (accepted) or 3 + the reason's
    /// length. A reader that reads only up to this never takes the bytes
    /// that follow the answer.
    pub fn needed(prefix: &[u8]) -> Result<usize, ProxyError> {
        match prefix {
            [] | [0, ..] => Ok(1),
            [1 | 2] | [1 | 2, _] => Ok(3),
            [1 | 2, hi, lo, ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                if len > MAX_REASON {
                    return Err(ProxyError::BadField {
                        field: "answer reason",
                        value: format!("{len} bytes"),
                        why: "longer than 1024 bytes",
                    });
                }
                Ok(3 + len)
            }
            [status, ..] => Err(ProxyError::BadAnswer(*status)),
        }
    }

    /// Decodes a whole answer: exactly [`Response::needed`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProxyError> {
        let needed = Self::needed(bytes)?;
        if bytes.len() < needed {
            return Err(ProxyError::Truncated(answer_part(bytes.len())));
        }
        if bytes.len() > needed {
            return Err(ProxyError::TrailingBytes(bytes.len() - needed));
        }
        if bytes[0] == 0 {
            return Ok(Response::Accepted);
        }
        let reason = String::from_utf8(bytes[3..].to_vec()).map_err(|_| ProxyError::BadField {
            field: "answer reason",
            value: format!("{} bytes", bytes.len() - 3),
            why: "not UTF-8",
        })?;
        Ok(if bytes[0] == 1 {
            Response::Denied { reason }
        } else {
            Response::Unreachable { reason }
        })
    }

    /// Reads exactly one answer from `reader`. Applies no deadline.
    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, ProxyError> {
        let mut bytes = Vec::new();
        loop {
            let needed = Self::needed(&bytes)?;
            if bytes.len() == needed {
                return Self::decode(&bytes);
            }
            let what = answer_part(bytes.len());
            let have = bytes.len();
            bytes.resize(needed, 0);
            read_exact(reader, &mut bytes[have..], what).await?;
        }
    }
}

/// The part of an answer that starts at byte `at`.
fn answer_part(at: usize) -> &'static str {
    match at {
        0 => "answer status",
        1 | 2 => "answer reason length",
        _ => "answer reason",
    }
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ProxyError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProxyError::Truncated(what)),
        Err(e) => Err(ProxyError::Io(e)),
    }
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn byte(&mut self, what: &'static str) -> Result<u8, ProxyError> {
        let (&b, rest) = self.rest.split_first().ok_or(ProxyError::Truncated(what))?;
        self.rest = rest;
        Ok(b)
    }

    fn string(&mut self, what: &'static str) -> Result<String, ProxyError> {
        let len = usize::from(self.byte(what)?);
        if len > MAX_NAME {
            return Err(ProxyError::BadField {
                field: what,
                value: format!("{len} bytes"),
                why: "longer than 63 bytes",
            });
        }
        if self.rest.len() < len {
            return Err(ProxyError::Truncated(what));
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProxyError::BadField {
            field: what,
            value: String::from_utf8_lossy(bytes).escape_debug().collect(),
            why: "not UTF-8",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MeshHeader {
        MeshHeader {
            network: "dev".into(),
            alias: "api".into(),
            port: 8080,
            source: Source {
                local: false,
                sandbox_id: Some("sbx_3f9a0c1d2e4b".into()),
                aliases: vec!["web".into(), "frontend-2".into()],
                tags: vec!["team:blue".into()],
            },
        }
    }

    async fn decode(bytes: &[u8]) -> Result<MeshHeader, ProxyError> {
        let mut reader = bytes;
        MeshHeader::read_from(&mut reader).await
    }

    #[tokio::test]
    async fn round_trip_reads_exactly_the_header() {
        for header in [
            sample(),
            MeshHeader {
                network: "n".into(),
                alias: "a".into(),
                port: 1,
                source: Source::local(),
            },
        ] {
            let mut bytes = header.encode().unwrap();
            bytes.extend_from_slice(b"payload");
            let mut reader = &bytes[..];
            assert_eq!(MeshHeader::read_from(&mut reader).await.unwrap(), header);
            assert_eq!(reader, b"payload");
        }
    }

    #[tokio::test]
    async fn answers_round_trip() {
        let long = "é".repeat(800);
        for answer in [
            Response::Accepted,
            Response::Denied {
                reason: "denied: no rule allows it (default deny)".into(),
            },
            Response::Unreachable {
                reason: "connection refused".into(),
            },
        ] {
            let bytes = answer.encode();
            assert_eq!(Response::read_from(&mut &bytes[..]).await.unwrap(), answer);
        }
        // An over-long reason is cut at a character boundary, not refused.
        let bytes = Response::Denied { reason: long }.encode();
        match Response::read_from(&mut &bytes[..]).await.unwrap() {
            Response::Denied { reason } => assert_eq!(reason.len(), 1024),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Response::read_from(&mut &[7u8][..]).await,
            Err(ProxyError::BadAnswer(7))
        ));
        assert!(matches!(
            Response::read_from(&mut &[1u8, 0, 5, b'a'][..]).await,
            Err(ProxyError::Truncated("answer reason"))
        ));
    }

    #[test]
    fn an_answer_is_read_to_its_exact_length() {
        assert_eq!(Response::needed(&[]).unwrap(), 1);
        assert_eq!(Response::needed(&[0]).unwrap(), 1);
        assert_eq!(Response::needed(&[1]).unwrap(), 3);
        assert_eq!(Response::needed(&[2, 0, 4]).unwrap(), 7);
        assert!(matches!(
            Response::needed(&[3]),
            Err(ProxyError::BadAnswer(3))
        ));
        let too_long = Response::needed(&[1, 0x04, 0x01]).unwrap_err().to_string();
        assert!(too_long.contains("1025 bytes"), "{too_long}");
        assert_eq!(Response::decode(&[0]).unwrap(), Response::Accepted);
        assert!(matches!(
            Response::decode(&[0, 0]),
            Err(ProxyError::TrailingBytes(1))
        ));
        assert!(matches!(
            Response::decode(&[1, 0]),
            Err(ProxyError::Truncated("answer reason length"))
        ));
        assert!(matches!(
            Response::decode(&[1, 0, 1, 0xff]),
            Err(ProxyError::BadField { .. })
        ));
    }

    #[tokio::test]
    async fn malformed_headers_name_what_is_wrong() {
        let good = sample().encode().unwrap();

        let mut bad = good.clone();
        bad[0] = b'X';
        let err = decode(&bad).await.unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");

        let mut bad = good.clone();
        bad[4] = 9;
        let err = decode(&bad).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported mesh header version 9 (this agent speaks 2)"
        );

        let err = decode(&good[..good.len() - 1]).await.unwrap_err();
        assert!(matches!(err, ProxyError::Truncated("header body")), "{err}");
        let err = decode(&good[..3]).await.unwrap_err();
        assert!(
            matches!(err, ProxyError::Truncated("header prefix")),
            "{err}"
        );

        let mut bad = good.clone();
        bad[5..7].copy_from_slice(&5000u16.to_be_bytes());
        let err = decode(&bad).await.unwrap_err();
        assert!(
            matches!(err, ProxyError::HeaderTooLong { len: 5007 }),
            "{err}"
        );

        // Network "Dev": not a DNS label.
        let mut bad = good.clone();
        bad[8] = b'D';
        let err = decode(&bad).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("mesh header: network name `Dev`"),
            "{err}"
        );

        // A label length of 64 inside the body.
        let mut bad = good.clone();
        bad[7] = 64;
        let err = decode(&bad).await.unwrap_err();
        assert!(err.to_string().contains("longer than 63"), "{err}");

        // Port 0.
        let header = MeshHeader {
            port: 0,
            ..sample()
        };
        assert!(header.encode().unwrap_err().to_string().contains("port"));
        let mut bad = good.clone();
        let port_at = PREFIX + 1 + 3 + 1 + 3;
        bad[port_at..port_at + 2].copy_from_slice(&[0, 0]);
        let err = decode(&bad).await.unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");

        // Trailing bytes inside the declared body.
        let mut bad = good.clone();
        bad.push(0);
        let body = (bad.len() - PREFIX) as u16;
        bad[5..7].copy_from_slice(&body.to_be_bytes());
        let err = decode(&bad).await.unwrap_err();
        assert!(matches!(err, ProxyError::TrailingBytes(1)), "{err}");
    }

    #[test]
    fn encoding_refuses_what_decoding_would() {
        let mut header = sample();
        header.source.aliases = (0..70).map(|i| format!("{i:0>63}")).collect();
        let err = header.encode().unwrap_err();
        assert!(matches!(err, ProxyError::HeaderTooLong { .. }), "{err}");

        let mut header = sample();
        header.source.tags = vec!["has space".into()];
        let err = header.encode().unwrap_err().to_string();
        assert!(err.contains("source tag `has space`"), "{err}");

        let mut header = sample();
        header.alias = "x".repeat(64);
        assert!(header.encode().is_err());
    }

    /// xorshift64*: deterministic, so a failure is reproducible from the seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[tokio::test]
    async fn mutated_and_random_bytes_never_panic() {
        let good = sample().encode().unwrap();
        let local = MeshHeader {
            source: Source::local(),
            ..sample()
        }
        .encode()
        .unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut decoded_ok = 0;
        for i in 0..20_000 {
            let mut bytes = if i % 2 == 0 {
                good.clone()
            } else {
                local.clone()
            };
            match rng.below(4) {
                0 => {
                    for _ in 0..=rng.below(4) {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                }
                1 => bytes.truncate(rng.below(bytes.len())),
                2 => {
                    // Keep the prefix valid so the body parser gets the bytes.
                    let len = rng.below(300);
                    bytes.truncate(PREFIX);
                    bytes[5..7].copy_from_slice(&(len as u16).to_be_bytes());
                    bytes.extend((0..len).map(|_| rng.next() as u8));
                }
                _ => {
                    bytes = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                }
            }
            if let Ok(header) = decode(&bytes).await {
                // Whatever decodes must be valid and re-encode identically.
                assert_eq!(
                    header.encode().unwrap(),
                    bytes[..header.encode().unwrap().len()]
                );
                decoded_ok += 1;
            }
            let _ = Response::read_from(&mut &bytes[..]).await;
        }
        // Mutations that hit the port or a flag-free byte still decode.
        assert!(decoded_ok > 0);
    }
}
