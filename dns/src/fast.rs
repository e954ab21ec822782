//! The UDP fast path: a plain A or AAAA query for an alias that has an
//! address of that type is answered straight from the wire bytes, without
//! hickory's message parsing, record building and encoding. The answer is
//! byte for byte the one the hickory path ([`crate::DnsHandler`]) gives for
//! the same bytes (tests and the fuzz target compare both); every query the
//! fast path does not recognise exactly goes to the hickory path.
//!
//! Recognised: QR=0, opcode QUERY, one question and no answer or authority
//! records; the question name uncompressed, in labels of letters, digits and
//! hyphens; QTYPE A or AAAA, QCLASS IN; either no additional record or one
//! OPT record (root owner, EDNS version 0, no extended rcode, no options);
//! nothing after it.

use crate::{records::RecordTable, RECORD_TTL_SECS};

const HEADER_LEN: usize = 12;
/// The longest name in wire form (RFC 1035 2.3.4).
const MAX_NAME_LEN: usize = 255;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// Header flag bits (RFC 1035 4.1.1, RFC 4035 3.2).
const FLAG_QR: u8 = 0x80;
const OPCODE_MASK: u8 = 0x78;
const FLAG_AA: u8 = 0x04;
const FLAG_RD: u8 = 0x01;
const FLAG_RA: u8 = 0x80;
const FLAG_CD: u8 = 0x10;
/// The EDNS DO bit in the high byte of the OPT flags.
const EDNS_DO: u8 = 0x80;

/// What the fast path read from a query it recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FastQuery {
    /// End of the question section (QNAME, QTYPE, QCLASS) in the packet.
    question_end: usize,
    /// Length of the lower-case wire-form name in the caller's buffer.
    name_len: usize,
    qtype: u16,
    /// The client's EDNS payload size and DO bit, if it sent an OPT.
    edns: Option<(u16, bool)>,
}

fn be16(packet: &[u8], at: usize) -> Option<u16> {
    let bytes = packet.get(at..at + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Recognises a query the fast path answers, writing its question name in
/// lower-case wire form into `name`. `None` for anything else, including
/// every malformed packet: those are the hickory path's to judge.
pub(crate) fn parse(packet: &[u8], name: &mut [u8; MAX_NAME_LEN]) -> Option<FastQuery> {
    let header = packet.get(..HEADER_LEN)?;
    if header[2] & (FLAG_QR | OPCODE_MASK) != 0 {
        return None;
    }
    let (questions, answers, authorities, additionals) = (
        be16(header, 4)?,
        be16(header, 6)?,
        be16(header, 8)?,
        be16(header, 10)?,
    );
    if questions != 1 || answers != 0 || authorities != 0 || additionals > 1 {
        return None;
    }

    let mut at = HEADER_LEN;
    let mut name_len = 0;
    loop {
        let label_len = usize::from(*packet.get(at)?);
        if label_len == 0 {
            break;
        }
        // 64 and above: a compression pointer or a reserved label type.
        if label_len > 63 || name_len + 1 + label_len + 1 > MAX_NAME_LEN {
            return None;
        }
        let label = packet.get(at + 1..at + 1 + label_len)?;
        name[name_len] = label_len as u8;
        for (to, &byte) in name[name_len + 1..].iter_mut().zip(label) {
            if !(byte.is_ascii_alphanumeric() || byte == b'-') {
                return None;
            }
            *to = byte.to_ascii_lowercase();
        }
        name_len += 1 + label_len;
        at += 1 + label_len;
    }
    name[name_len] = 0;
    name_len += 1;
    at += 1;

    let qtype = be16(packet, at)?;
    let qclass = be16(packet, at + 2)?;
    if !matches!(qtype, TYPE_A | TYPE_AAAA) || qclass != CLASS_IN {
        return None;
    }
    let question_end = at + 4;

    let edns = if additionals == 1 {
        // Root owner, TYPE OPT, CLASS = payload, TTL = extended rcode,
        // version, flags; RDLENGTH 0.
        let opt = packet.get(question_end..)?;
        if opt.len() != 11 || opt[0] != 0 || be16(opt, 1)? != TYPE_OPT {
            return None;
        }
        let (payload, extended_rcode, version) = (be16(opt, 3)?, opt[5], opt[6]);
        if extended_rcode != 0 || version != 0 || be16(opt, 9)? != 0 {
            return None;
        }
        Some((payload, opt[7] & EDNS_DO != 0))
    } else {
        if packet.len() != question_end {
            return None;
        }
        None
    };
    Some(FastQuery {
        question_end,
        name_len,
        qtype,
        edns,
    })
}

/// Writes the answer to `query` (recognised by [`parse`] into `name`) into
/// `out`, as the hickory path would: `false` (and `out` untouched) when the
/// table has no address of the asked type for the name, so that the hickory
/// path gives the NXDOMAIN or NODATA answer with its SOA.
pub(crate) fn answer(
    packet: &[u8],
    query: &FastQuery,
    name: &[u8; MAX_NAME_LEN],
    table: &RecordTable,
    recursion_available: bool,
    max_payload: u16,
    out: &mut Vec<u8>,
) -> bool {
    let Some(addrs) = table.lookup_wire(&name[..query.name_len]) else {
        return false;
    };
    let v4: [u8; 4];
    let v6: [u8; 16];
    let rdata: &[u8] = match (query.qtype, addrs.ipv4, addrs.ipv6) {
        (TYPE_A, Some(ip), _) => {
            v4 = ip.octets();
            &v4
        }
        (TYPE_AAAA, _, Some(ip)) => {
            v6 = ip.octets();
            &v6
        }
        _ => return false,
    };

    out.clear();
    // Header: the query's id, QR, its opcode (QUERY), AA, its RD; RA when
    // there is an upstream, its CD, NOERROR; one question, one answer, the
    // OPT if the query had one.
    out.extend_from_slice(&packet[..2]);
    out.push(FLAG_QR | FLAG_AA | (packet[2] & FLAG_RD));
    out.push(if recursion_available { FLAG_RA } else { 0 } | (packet[3] & FLAG_CD));
    out.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, u8::from(query.edns.is_some())]);
    // The question as it came, case included.
    out.extend_from_slice(&packet[HEADER_LEN..query.question_end]);
    // The answer: the question name again, uncompressed and in its case
    // (hickory compresses no names), its type, IN, the TTL.
    out.extend_from_slice(&packet[HEADER_LEN..query.question_end - 4]);
    out.extend_from_slice(&query.qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&RECORD_TTL_SECS.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
    if let Some((payload, dnssec_ok)) = query.edns {
        // Our OPT: root owner, our payload size (the client's, within
        // 512..=max_payload), version 0, the client's DO bit, no options.
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&payload.clamp(512, max_payload).to_be_bytes());
        out.extend_from_slice(&[0, 0, if dnssec_ok { EDNS_DO } else { 0 }, 0, 0, 0]);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[&str], qtype: u16, edns: Option<[u8; 11]>) -> Vec<u8> {
        let mut packet = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name {
            packet.push(label.len() as u8);
            packet.extend_from_slice(label.as_bytes());
        }
        packet.push(0);
        packet.extend_from_slice(&qtype.to_be_bytes());
        packet.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(opt) = edns {
            packet[11] = 1;
            packet.extend_from_slice(&opt);
        }
        packet
    }

    const OPT: [u8; 11] = [0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0];

    fn parsed(packet: &[u8]) -> Option<(FastQuery, Vec<u8>)> {
        let mut name = [0; MAX_NAME_LEN];
        parse(packet, &mut name).map(|query| (query, name[..query.name_len].to_vec()))
    }

    #[test]
    fn plain_queries_are_recognised_with_a_lower_case_name() {
        let packet = query(&["API", "Dev", "gstacks"], TYPE_A, None);
        let (query_info, name) = parsed(&packet).unwrap();
        assert_eq!(name, b"\x03api\x03dev\x07gstacks\x00");
        assert_eq!(query_info.question_end, packet.len());
        assert_eq!(query_info.edns, None);
        let packet = query(&["api", "dev", "gstacks"], TYPE_AAAA, Some(OPT));
        let (query_info, _) = parsed(&packet).unwrap();
        assert_eq!(query_info.edns, Some((4096, true)));
        assert_eq!(query_info.qtype, TYPE_AAAA);
        // The root name is a name too (the table never holds it).
        assert!(parsed(&query(&[], TYPE_A, None)).is_some());
    }

    #[test]
    fn everything_else_is_left_to_the_hickory_path() {
        let good = query(&["api", "dev", "gstacks"], TYPE_A, None);
        // Every truncation of a good query, the empty packet included.
        for len in 0..good.len() {
            assert_eq!(parsed(&good[..len]), None, "truncated to {len}");
        }
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut edit = |why, change: &dyn Fn(&mut Vec<u8>)| {
            let mut packet = good.clone();
            change(&mut packet);
            cases.push((why, packet));
        };
        edit("response", &|p| p[2] |= FLAG_QR);
        edit("opcode STATUS", &|p| p[2] |= 2 << 3);
        edit("no question", &|p| p[5] = 0);
        edit("two questions", &|p| p[5] = 2);
        edit("an answer record", &|p| p[7] = 1);
        edit("an authority record", &|p| p[9] = 1);
        edit("two additional records", &|p| p[11] = 2);
        edit("an additional record missing", &|p| p[11] = 1);
        edit("trailing bytes", &|p| p.push(0));
        edit("type MX", &|p| {
            let at = p.len() - 3;
            p[at] = 15;
        });
        edit("class CH", &|p| {
            let at = p.len() - 1;
            p[at] = 3;
        });
        edit("a dot inside a label", &|p| p[14] = b'.');
        edit("a NUL inside a label", &|p| p[14] = 0);
        edit("an underscore", &|p| p[14] = b'_');
        edit("a non-ASCII byte", &|p| p[14] = 0xe1);
        edit("a label length beyond the packet", &|p| p[12] = 60);
        edit("a reserved label type", &|p| p[12] = 0x40);
        // A pointer to itself: a loop for a parser that follows pointers.
        edit("a compression pointer", &|p| {
            p.truncate(12);
            p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        });
        for (why, packet) in &cases {
            assert_eq!(parsed(packet), None, "{why}");
        }

        let with_opt = |opt: [u8; 11]| query(&["api", "dev", "gstacks"], TYPE_A, Some(opt));
        let mut opt = OPT;
        opt[0] = 3; // owner not the root
        assert_eq!(parsed(&with_opt(opt)), None);
        let mut opt = OPT;
        opt[2] = 1; // an A record, not OPT
        assert_eq!(parsed(&with_opt(opt)), None);
        let mut opt = OPT;
        opt[5] = 1; // extended rcode
        assert_eq!(parsed(&with_opt(opt)), None);
        let mut opt = OPT;
        opt[6] = 1; // EDNS version 1: BADVERS from the hickory path
        assert_eq!(parsed(&with_opt(opt)), None);
        let mut opt = OPT;
        opt[10] = 4; // options
        assert_eq!(parsed(&with_opt(opt)), None);
        let mut packet = with_opt(OPT);
        packet.push(0);
        assert_eq!(parsed(&packet), None);
    }

    #[test]
    fn names_longer_than_255_bytes_are_left_to_the_hickory_path() {
        let label = "a".repeat(63);
        // Four 63-byte labels: 4 * 64 + 1 = 257 bytes in wire form.
        let long = query(&[&label, &label, &label, &label], TYPE_A, None);
        assert_eq!(parsed(&long), None);
        // Three of them and one of 61: exactly 255.
        let short = "b".repeat(61);
        let packet = query(&[&label, &label, &label, &short], TYPE_A, None);
        let (_, name) = parsed(&packet).unwrap();
        assert_eq!(name.len(), 255);
        // 62 would make 256.
        let over = "b".repeat(62);
        assert_eq!(
            parsed(&query(&[&label, &label, &label, &over], TYPE_A, None)),
            None
        );
    }
}
