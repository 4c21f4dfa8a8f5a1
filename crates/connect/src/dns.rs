//! DNS as the daemon's resolver needs it: a query's question read from untrusted bytes, and the answers for
//! the names it owns (A records, NODATA, NXDOMAIN with the zone's SOA). Everything else is forwarded byte for
//! byte, so only questions are ever parsed. No I/O here; fuzzed (`fuzz/fuzz_targets/dns.rs`).

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Record types this server answers with data.
pub const TYPE_A: u16 = 1;
const TYPE_SOA: u16 = 6;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// Response codes.
pub const FORMERR: u8 = 1;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const NOTIMP: u8 = 4;

/// The question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The query's flags word (opcode and RD are echoed).
    pub flags: u16,
    /// Lower-case, dot-separated, without the root's trailing dot (`""` for the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question section ends in the query.
    pub question_end: usize,
}

/// Why bytes are not a query this server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer than 12 bytes: not even a header to answer.
    Short,
    /// A response, not a query (never answered, so two servers cannot loop).
    Response,
    /// A header is there but the rest is not a query this server reads; answer with this code.
    Refuse(u8, &'static str),
}

/// Reads a query's header and its one question.
pub fn parse_query(buf: &[u8]) -> Result<Query, ParseError> {
    if buf.len() < HEADER {
        return Err(ParseError::Short);
    }
    let word = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
    let (id, flags) = (word(0), word(2));
    if flags & 0x8000 != 0 {
        return Err(ParseError::Response);
    }
    if (flags >> 11) & 0xf != 0 {
        return Err(ParseError::Refuse(NOTIMP, "only standard queries"));
    }
    if word(4) != 1 {
        return Err(ParseError::Refuse(FORMERR, "exactly one question"));
    }
    let mut name = String::new();
    let mut i = HEADER;
    loop {
        let Some(&len) = buf.get(i) else {
            return Err(ParseError::Refuse(FORMERR, "the question is cut short"));
        };
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return Err(ParseError::Refuse(
                FORMERR,
                "compressed or over-long label in the question",
            ));
        }
        let Some(label) = buf.get(i..i + usize::from(len)) else {
            return Err(ParseError::Refuse(FORMERR, "the question is cut short"));
        };
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            // Names this server owns are DNS-1123 labels; any other byte still makes a name to forward.
            name.push(char::from(b.to_ascii_lowercase()));
        }
        i += usize::from(len);
        if i - HEADER > 255 {
            return Err(ParseError::Refuse(FORMERR, "the name is longer than 255"));
        }
    }
    let Some(tail) = buf.get(i..i + 4) else {
        return Err(ParseError::Refuse(FORMERR, "the question is cut short"));
    };
    Ok(Query {
        id,
        flags,
        name,
        qtype: u16::from_be_bytes([tail[0], tail[1]]),
        qclass: u16::from_be_bytes([tail[2], tail[3]]),
        question_end: i + 4,
    })
}

/// What the zone says of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Found(Ipv4Addr),
    /// Under the suffix, but no such name.
    NxDomain,
    /// Not this server's: forward it.
    Forward,
}

/// The names the daemon answers for: `<component>.<project>.<env>.<suffix>`, and the primary environment's
/// components by their bare name.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    suffix: String,
    names: HashMap<String, Ipv4Addr>,
}

impl Zone {
    /// An empty zone under `suffix` (e.g. `kiln`).
    pub fn new(suffix: &str) -> Zone {
        Zone {
            suffix: suffix.trim_matches('.').to_ascii_lowercase(),
            names: HashMap::new(),
        }
    }

    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// Replaces every name.
    pub fn set(&mut self, names: HashMap<String, Ipv4Addr>) {
        self.names = names;
    }

    /// The names, sorted (for the hosts file and status).
    pub fn names(&self) -> Vec<(String, Ipv4Addr)> {
        let mut v: Vec<_> = self.names.iter().map(|(n, a)| (n.clone(), *a)).collect();
        v.sort();
        v
    }

    /// Whether `name` (lower-case, no trailing dot) is the suffix or under it.
    pub fn owns(&self, name: &str) -> bool {
        name == self.suffix
            || name
                .strip_suffix(self.suffix.as_str())
                .is_some_and(|head| head.ends_with('.'))
    }

    pub fn lookup(&self, name: &str) -> Lookup {
        if let Some(a) = self.names.get(name) {
            return Lookup::Found(*a);
        }
        if self.owns(name) {
            Lookup::NxDomain
        } else {
            Lookup::Forward
        }
    }
}

/// Writes the answer to `q` (a name the zone owns or resolved) into `out`.
pub fn answer(q: &Query, query: &[u8], lookup: Lookup, zone: &str, ttl: u32, out: &mut Vec<u8>) {
    out.clear();
    let rcode = match lookup {
        Lookup::NxDomain => NXDOMAIN,
        _ => 0,
    };
    let a = match lookup {
        Lookup::Found(ip) if q.qclass == CLASS_IN && matches!(q.qtype, TYPE_A | TYPE_ANY) => {
            Some(ip)
        }
        _ => None,
    };
    // QR, the query's opcode (0) and RD, AA, RA.
    let flags = 0x8000 | (q.flags & 0x0100) | 0x0400 | 0x0080 | u16::from(rcode);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(a.is_some()).to_be_bytes());
    out.extend_from_slice(&u16::from(a.is_none()).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&query[HEADER..q.question_end]);
    match a {
        Some(ip) => {
            out.extend_from_slice(&[0xc0, 0x0c]);
            out.extend_from_slice(&TYPE_A.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        None => soa(zone, ttl, out),
    }
}

/// The zone's SOA record (the authority of a negative answer; its minimum is the negative caching time).
fn soa(zone: &str, ttl: u32, out: &mut Vec<u8>) {
    put_name(zone, out);
    out.extend_from_slice(&TYPE_SOA.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    put_name(&format!("ns.{zone}"), out);
    put_name(&format!("hostmaster.{zone}"), out);
    for v in [1u32, 3600, 600, 86400, ttl] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    let len = (out.len() - len_at - 2) as u16;
    out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
}

fn put_name(name: &str, out: &mut Vec<u8>) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let l = &label.as_bytes()[..label.len().min(63)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

/// A header-only error response (`rcode`) to a query whose header could be read.
pub fn error_response(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if query.len() < HEADER {
        return None;
    }
    let flags = u16::from_be_bytes([query[2], query[3]]);
    let flags = 0x8000 | (flags & 0x7900) | 0x0080 | u16::from(rcode);
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// Encodes a query for `name` (for tests and probes).
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + name.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    put_name(name, &mut out);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// What a server does with any bytes it receives: the answer to send, `Forward` for a name not its own, or
/// nothing (not a query). Never panics.
pub fn handle(zone: &Zone, query: &[u8], ttl: u32, out: &mut Vec<u8>) -> Handled {
    match parse_query(query) {
        Err(ParseError::Short | ParseError::Response) => Handled::Drop,
        Err(ParseError::Refuse(code, _)) => match error_response(query, code) {
            Some(r) => {
                *out = r;
                Handled::Answer
            }
            None => Handled::Drop,
        },
        Ok(q) => match zone.lookup(&q.name) {
            Lookup::Forward => Handled::Forward,
            l => {
                answer(&q, query, l, zone.suffix(), ttl, out);
                Handled::Answer
            }
        },
    }
}

/// See [`handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// `out` holds the answer.
    Answer,
    Forward,
    Drop,
}

/// The properties the fuzz target (`fuzz/fuzz_targets/dns.rs`) checks, shared with this crate's tests.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Whatever the bytes, [`handle`] does not panic, and an answer is a response to that very query: its id,
    /// QR set, and for a question it read, that question copied verbatim.
    pub fn check(data: &[u8]) {
        let mut zone = Zone::new("kiln");
        zone.set(HashMap::from([
            (
                "api.shop.dev.kiln".to_string(),
                Ipv4Addr::new(127, 77, 1, 1),
            ),
            ("api".to_string(), Ipv4Addr::new(127, 77, 1, 1)),
        ]));
        let mut out = Vec::new();
        if handle(&zone, data, 5, &mut out) != Handled::Answer {
            return;
        }
        assert!(out.len() >= HEADER, "an answer has a header");
        assert_eq!(out[..2], data[..2], "an answer carries the query's id");
        assert!(out[2] & 0x80 != 0, "an answer is a response");
        if let Ok(q) = parse_query(data) {
            assert_eq!(
                out[HEADER..q.question_end],
                data[HEADER..q.question_end],
                "the question is copied"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        let mut z = Zone::new("kiln");
        z.set(HashMap::from([
            (
                "api.shop.dev.kiln".to_string(),
                Ipv4Addr::new(127, 77, 1, 1),
            ),
            ("api".to_string(), Ipv4Addr::new(127, 77, 1, 1)),
        ]));
        z
    }

    #[test]
    fn answers_its_names_and_forwards_the_rest() {
        let z = zone();
        let q = encode_query(7, "API.shop.dev.kiln", TYPE_A);
        let mut out = Vec::new();
        assert_eq!(handle(&z, &q, 5, &mut out), Handled::Answer);
        assert_eq!(&out[..2], &[0, 7]);
        assert_eq!(out[3] & 0xf, 0);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 1);
        assert_eq!(&out[out.len() - 4..], &[127, 77, 1, 1]);

        let q = encode_query(8, "nope.shop.dev.kiln", TYPE_A);
        assert_eq!(handle(&z, &q, 5, &mut out), Handled::Answer);
        assert_eq!(out[3] & 0xf, NXDOMAIN);
        assert_eq!(u16::from_be_bytes([out[8], out[9]]), 1, "the SOA");

        let q = encode_query(9, "api.shop.dev.kiln", 28);
        assert_eq!(handle(&z, &q, 5, &mut out), Handled::Answer);
        assert_eq!(out[3] & 0xf, 0, "NODATA, not NXDOMAIN");
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 0);

        for other in ["example.com", "kilnx", "xkiln", "shop"] {
            let q = encode_query(1, other, TYPE_A);
            assert_eq!(handle(&z, &q, 5, &mut out), Handled::Forward, "{other}");
        }
    }

    #[test]
    fn bad_bytes_are_refused_or_dropped() {
        let z = zone();
        let mut out = Vec::new();
        assert_eq!(handle(&z, &[1, 2, 3], 5, &mut out), Handled::Drop);
        let mut resp = encode_query(1, "api", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(handle(&z, &resp, 5, &mut out), Handled::Drop);
        let mut cut = encode_query(1, "api.shop.dev.kiln", TYPE_A);
        cut.truncate(20);
        assert_eq!(handle(&z, &cut, 5, &mut out), Handled::Answer);
        assert_eq!(out[3] & 0xf, FORMERR);
        let mut pointer = encode_query(1, "api", TYPE_A);
        pointer[12] = 0xc0;
        assert_eq!(handle(&z, &pointer, 5, &mut out), Handled::Answer);
        assert_eq!(out[3] & 0xf, FORMERR);
    }

    #[test]
    fn any_bytes_never_panic() {
        let z = zone();
        let mut out = Vec::new();
        let base = encode_query(3, "api.shop.dev.kiln", TYPE_A);
        for i in 0..base.len() {
            for b in [0u8, 1, 63, 64, 0xc0, 0xff] {
                let mut q = base.clone();
                q[i] = b;
                let _ = handle(&z, &q, 5, &mut out);
                fuzzing::check(&q);
                fuzzing::check(&q[..i]);
            }
        }
    }
}
