//! Engine.IO long-polling payloads: the packets of one HTTP body.
//!
//! Engine.IO 4 separates packets with `\x1e`. Engine.IO 3 prefixes each
//! with its length and `:`, the length counted in UTF-16 code units (it is
//! a JavaScript string length), so a packet with characters outside the
//! Basic Multilingual Plane counts them twice. Binary payloads (Engine.IO 3's
//! `application/octet-stream`) are not accepted: pulso serves no binary
//! events.

/// Engine.IO 4's packet separator.
const SEPARATOR: u8 = 0x1e;

/// Appends one text packet to a payload being built.
pub fn push(out: &mut Vec<u8>, packet: &[u8], eio3: bool) {
    if eio3 {
        use std::io::Write;
        // Writing to a `Vec` cannot fail.
        let _ = write!(out, "{}:", utf16_len(packet));
    } else if !out.is_empty() {
        out.push(SEPARATOR);
    }
    out.extend_from_slice(packet);
}

/// The UTF-16 length of UTF-8 text: one unit per character, two for a
/// character of four bytes.
fn utf16_len(text: &[u8]) -> usize {
    text.iter()
        .map(|&b| match b {
            0x80..=0xBF => 0,
            0xF0..=0xFF => 2,
            _ => 1,
        })
        .sum()
}

/// The packets of a POSTed payload, in order, read as they are handled
/// (nothing is collected: a body of many tiny packets costs no memory).
pub fn packets(body: &str, eio3: bool) -> Packets<'_> {
    Packets {
        rest: body,
        eio3,
        first: true,
    }
}

pub struct Packets<'a> {
    rest: &'a str,
    eio3: bool,
    /// An empty Engine.IO 4 body is one empty packet, which is refused.
    first: bool,
}

impl<'a> Iterator for Packets<'a> {
    type Item = Result<&'a str, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        // An empty Engine.IO 4 body still yields its one (empty) packet.
        if self.rest.is_empty() && (self.eio3 || !self.first) {
            return None;
        }
        self.first = false;
        let next = if self.eio3 {
            next_v3(self.rest)
        } else {
            let (packet, rest) = match self.rest.split_once(SEPARATOR as char) {
                // A trailing separator leaves an empty packet behind it.
                Some((packet, "")) => (packet, "\u{1e}"),
                Some((packet, rest)) => (packet, rest),
                None => (self.rest, ""),
            };
            if packet.is_empty() {
                Err("empty packet")
            } else {
                Ok((packet, rest))
            }
        };
        match next {
            Ok((packet, rest)) => {
                self.rest = rest;
                Some(Ok(packet))
            }
            Err(why) => {
                self.rest = "";
                Some(Err(why))
            }
        }
    }
}

/// One `<length>:<packet>`, the length in UTF-16 units.
fn next_v3(rest: &str) -> Result<(&str, &str), &'static str> {
    let (len, after) = rest.split_once(':').ok_or("packet without a length")?;
    if len.is_empty() || len.len() > 9 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err("invalid packet length");
    }
    let want: usize = len.parse().map_err(|_| "invalid packet length")?;
    // The byte offset where `want` UTF-16 units end.
    let mut units = 0;
    let mut end = after.len();
    for (i, c) in after.char_indices() {
        if units == want {
            end = i;
            break;
        }
        units += c.len_utf16();
    }
    if units != want || want == 0 {
        return Err("packet length does not match");
    }
    Ok((&after[..end], &after[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn split(body: &str, eio3: bool) -> Result<Vec<&str>, &'static str> {
        packets(body, eio3).collect()
    }

    fn payload(packets: &[&str], eio3: bool) -> String {
        let mut out = Vec::new();
        for p in packets {
            push(&mut out, p.as_bytes(), eio3);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn engine_io_4_separates_packets() {
        assert_eq!(payload(&["40", "42[\"a\"]"], false), "40\u{1e}42[\"a\"]");
        assert_eq!(payload(&["6"], false), "6");
        assert_eq!(split("40\u{1e}3", false).unwrap(), vec!["40", "3"]);
        assert_eq!(split("1", false).unwrap(), vec!["1"]);
        assert!(split("", false).is_err());
        assert!(split("2\u{1e}\u{1e}2", false).is_err());
    }

    /// Lengths count UTF-16 code units, as JavaScript does: `é` is one,
    /// an emoji two.
    #[test]
    fn engine_io_3_prefixes_utf16_lengths() {
        assert_eq!(payload(&["40", "2"], true), "2:401:2");
        assert_eq!(payload(&["4é"], true), "2:4é");
        assert_eq!(payload(&["4😀x"], true), "4:4😀x");
        assert_eq!(
            split("2:401:24:4😀x2:4é", true).unwrap(),
            vec!["40", "2", "4😀x", "4é"]
        );
        assert_eq!(
            split(&payload(&["42[\"€\",\"😀😀\"]", "3"], true), true).unwrap(),
            vec!["42[\"€\",\"😀😀\"]", "3"]
        );
        for bad in [
            "2",
            "x:40",
            ":40",
            "3:40",
            "0:",
            "9:4",
            "2:4😀",
            "1234567890:4",
        ] {
            assert!(split(bad, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn random_payloads_never_panic() {
        let mut rng = crate::test_seed::rng("random_payloads_never_panic");
        const PIECES: [&str; 8] = ["1", "2", ":", "4", "é", "😀", "\u{1e}", "0"];
        for _ in 0..20_000 {
            let len = rng.random_range(0..10);
            let text: String = (0..len)
                .map(|_| PIECES[rng.random_range(0..PIECES.len())])
                .collect();
            for eio3 in [true, false] {
                // What parses encodes back to the same packets.
                if let Ok(packets) = split(&text, eio3) {
                    let rebuilt = payload(&packets, eio3);
                    assert_eq!(split(&rebuilt, eio3), Ok(packets), "{text:?}");
                }
            }
        }
    }
}
