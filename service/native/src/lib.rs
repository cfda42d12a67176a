//! The hot recipient path, compiled: the raw bytes of one `SendStreamRequest` chunk
//! (`encode_chunk`) or of one unary `SendRequest` (`encode_send`) become each recipient's
//! canonical Braze JSON (keys sorted at every depth), byte for byte what
//! `edge.convert.recipient_to_dict` then `validate.check_and_encode` make in Python.
//!
//! Only the common recipient is handled here: a non-empty `external_user_id` with, perhaps, one
//! `context` (or `canvas_entry_properties`), whose numbers JSON can carry, within the size
//! limit. Any other message (a header, another recipient field, a number that is NOT_JSON, a
//! field sent twice that protobuf would merge, bytes that do not decode, deep nesting, a group)
//! gives `None`, and the caller takes the whole message down the Python path, which is the
//! reference: its rules and violations are never restated here.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// Nesting (Struct and ListValue levels) beyond which the Python path decides: well below upb's
/// limit of 100 messages (a Struct level is three: Struct, map entry, Value).
const MAX_DEPTH: u32 = 16;
/// 2^53: past it a double cannot tell an integer from its neighbours (convert's NOT_JSON).
const EXACT_INT_LIMIT: f64 = 9_007_199_254_740_992.0;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value: u64 = 0;
        for shift in 0..10 {
            let byte = *self.buf.get(self.pos)?;
            self.pos += 1;
            if shift == 9 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }

    fn tag(&mut self) -> Option<(u32, u8)> {
        let tag = self.varint()?;
        let field = tag >> 3;
        if field == 0 || field > 0x1fff_ffff {
            return None;
        }
        Some((field as u32, (tag & 7) as u8))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn len_delimited(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    fn fixed64(&mut self) -> Option<u64> {
        let bytes = self.take(8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        Some(u64::from_le_bytes(word))
    }

    /// Skip an unknown field; a group (wire types 3 and 4) is left to the Python path.
    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            VARINT => self.varint().map(|_| ()),
            FIXED64 => self.take(8).map(|_| ()),
            LEN => self.len_delimited().map(|_| ()),
            FIXED32 => self.take(4).map(|_| ()),
            _ => None,
        }
    }
}

/// Calls `each` with every occurrence of repeated length-delimited field `field` of the message
/// in `buf`, in order, skipping the other fields; None (for the Python path) if it comes with
/// another wire type, or as soon as `each` says None.
fn each_repeated<'a>(
    buf: &'a [u8],
    field: u32,
    mut each: impl FnMut(&'a [u8]) -> Option<()>,
) -> Option<()> {
    let mut reader = Reader::new(buf);
    while !reader.done() {
        let (number, wire) = reader.tag()?;
        if number != field {
            reader.skip(wire)?;
            continue;
        }
        if wire != LEN {
            return None;
        }
        each(reader.len_delimited()?)?;
    }
    Some(())
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// A JSON string as orjson writes it: `"` and `\` escaped, control characters as \b \t \n \f
/// \r or \u00xx, everything else (non-ASCII included) as it is.
fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 15) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// convert's number rule: an integral double below 2^53 is an int; a NaN, an infinity or an
/// integral magnitude of 2^53 or more is NOT_JSON (None).
fn write_number(out: &mut Vec<u8>, x: f64) -> Option<()> {
    if !x.is_finite() {
        return None;
    }
    if x.fract() == 0.0 {
        if !(-EXACT_INT_LIMIT < x && x < EXACT_INT_LIMIT) {
            return None;
        }
        let mut buf = itoa_buf(x as i64);
        out.append(&mut buf);
        return Some(());
    }
    let mut buffer = ryu::Buffer::new();
    out.extend_from_slice(buffer.format_finite(x).as_bytes());
    Some(())
}

fn itoa_buf(n: i64) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// One google.protobuf.Value. More than one `kind` field (protobuf keeps the last, or merges
/// two messages) is left to the Python path.
fn write_value(out: &mut Vec<u8>, buf: &[u8], depth: u32) -> Option<()> {
    let mut reader = Reader::new(buf);
    let mut kinds = 0;
    let mut kind: Option<(u32, u8, &[u8], u64)> = None;
    while !reader.done() {
        let (field, wire) = reader.tag()?;
        let expected = match field {
            1 | 4 => VARINT,
            2 => FIXED64,
            3 | 5 | 6 => LEN,
            _ => {
                reader.skip(wire)?;
                continue;
            }
        };
        if wire != expected {
            return None;
        }
        kinds += 1;
        kind = Some(match wire {
            VARINT => (field, wire, &buf[0..0], reader.varint()?),
            FIXED64 => (field, wire, &buf[0..0], reader.fixed64()?),
            _ => (field, wire, reader.len_delimited()?, 0),
        });
    }
    if kinds > 1 {
        return None;
    }
    match kind {
        None | Some((1, ..)) => out.extend_from_slice(b"null"),
        Some((2, _, _, bits)) => write_number(out, f64::from_bits(bits))?,
        Some((3, _, bytes, _)) => write_str(out, text(bytes)?),
        Some((4, _, _, n)) => out.extend_from_slice(if n != 0 { b"true" } else { b"false" }),
        Some((5, _, bytes, _)) => write_struct(out, bytes, depth + 1)?,
        Some((_, _, bytes, _)) => write_list(out, bytes, depth + 1)?,
    }
    Some(())
}

fn write_list(out: &mut Vec<u8>, buf: &[u8], depth: u32) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    out.push(b'[');
    let mut first = true;
    each_repeated(buf, 1, |value| {
        if !first {
            out.push(b',');
        }
        first = false;
        write_value(out, value, depth)
    })?;
    out.push(b']');
    Some(())
}

/// A google.protobuf.Struct with its keys sorted (by code point, as orjson's OPT_SORT_KEYS);
/// a key sent twice keeps its last value, as protobuf's map does.
fn write_struct(out: &mut Vec<u8>, buf: &[u8], depth: u32) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    // Each value is written to `scratch` first (so that a value protobuf would drop is still
    // checked, as upb checks it), then copied out in key order.
    let mut scratch: Vec<u8> = Vec::new();
    let mut entries: Vec<(&str, usize, usize)> = Vec::new();
    each_repeated(buf, 1, |bytes| {
        let mut entry = Reader::new(bytes);
        let mut key = "";
        let mut value: Option<&[u8]> = None;
        while !entry.done() {
            let (field, wire) = entry.tag()?;
            match (field, wire) {
                (1, LEN) => key = text(entry.len_delimited()?)?,
                (2, LEN) => {
                    if value.is_some() {
                        return None; // two values of one entry would merge
                    }
                    value = Some(entry.len_delimited()?);
                }
                // upb moves an entry with an unknown field out of the map: Python's to say.
                _ => return None,
            }
        }
        let start = scratch.len();
        match value {
            Some(bytes) => write_value(&mut scratch, bytes, depth)?,
            None => scratch.extend_from_slice(b"null"),
        }
        entries.push((key, start, scratch.len()));
        Some(())
    })?;
    // Stable: among equal keys the last one sent comes last, and is the one kept.
    entries.sort_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    let mut first = true;
    for (i, &(key, start, end)) in entries.iter().enumerate() {
        if i + 1 < entries.len() && entries[i + 1].0 == key {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, key);
        out.push(b':');
        out.extend_from_slice(&scratch[start..end]);
    }
    out.push(b'}');
    Some(())
}

/// One Recipient, if it is the common one: `{"<context_name>":{...},"external_user_id":"..."}`.
fn write_recipient(out: &mut Vec<u8>, buf: &[u8], context_name: &str) -> Option<()> {
    let mut reader = Reader::new(buf);
    let mut user: Option<&str> = None;
    let mut context: Option<&[u8]> = None;
    while !reader.done() {
        let (field, wire) = reader.tag()?;
        match field {
            1 => {
                if wire != LEN {
                    return None;
                }
                user = Some(text(reader.len_delimited()?)?);
            }
            5 | 6 => {
                if wire != LEN || context.is_some() {
                    return None; // both names (a violation), or one sent twice (merged)
                }
                context = Some(reader.len_delimited()?);
            }
            2..=8 => return None,
            _ => reader.skip(wire)?,
        }
    }
    let user = user.filter(|user| !user.is_empty())?;
    out.push(b'{');
    if let Some(bytes) = context {
        write_str(out, context_name);
        out.push(b':');
        write_struct(out, bytes, 1)?;
        out.push(b',');
    }
    out.extend_from_slice(b"\"external_user_id\":");
    write_str(out, user);
    out.push(b'}');
    Some(())
}

/// The one length-delimited field `field` of a message: None when it is missing, of another
/// wire type or sent twice (protobuf would merge the two), or when field `refused` is there.
fn only_part(raw: &[u8], field: u32, refused: Option<u32>) -> Option<&[u8]> {
    let mut reader = Reader::new(raw);
    let mut part: Option<&[u8]> = None;
    while !reader.done() {
        let (number, wire) = reader.tag()?;
        if number == field {
            if wire != LEN || part.is_some() {
                return None;
            }
            part = Some(reader.len_delimited()?);
        } else if Some(number) == refused {
            return None;
        } else {
            reader.skip(wire)?;
        }
    }
    part
}

/// Every recipient (repeated field `field` of the message in `buf`, the others skipped),
/// encoded into `out`, with where each one ends.
fn encode_recipients(
    buf: &[u8],
    field: u32,
    context_name: &str,
    limit: usize,
) -> Option<(Vec<u8>, Vec<usize>)> {
    let mut out = Vec::with_capacity(buf.len() * 2);
    let mut ends = Vec::new();
    each_repeated(buf, field, |recipient| {
        let start = out.len();
        write_recipient(&mut out, recipient, context_name)?;
        if out.len() - start > limit {
            return None;
        }
        ends.push(out.len());
        Some(())
    })?;
    Some((out, ends))
}

/// The encoded recipients as a list of `bytes`, one each; None stays None.
fn to_list<'py>(
    py: Python<'py>,
    encoded: Option<(Vec<u8>, Vec<usize>)>,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let (out, ends) = match encoded {
        Some(encoded) => encoded,
        None => return Ok(None),
    };
    let mut start = 0;
    let items = ends.iter().map(|&end| {
        let item = PyBytes::new(py, &out[start..end]);
        start = end;
        item
    });
    Ok(Some(PyList::new(py, items)?))
}

/// The recipients of one raw `SendStreamRequest` chunk (field 2, its recipients field 1) as
/// canonical JSON, one `bytes` each, or None when any part of the message is for the Python
/// path to read (a header among them: the Python path says what is wrong).
#[pyfunction]
fn encode_chunk<'py>(
    py: Python<'py>,
    raw: &[u8],
    context_name: &str,
    limit: usize,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let encoded = only_part(raw, 2, Some(1))
        .and_then(|chunk| encode_recipients(chunk, 1, context_name, limit));
    to_list(py, encoded)
}

/// The recipients of one raw `SendRequest`'s trigger (field 1, its recipients field 6) as
/// canonical JSON, one `bytes` each, or None as `encode_chunk`. The trigger's other fields and
/// the options are skipped: the caller reads them (and every rule about them) with protobuf.
#[pyfunction]
fn encode_send<'py>(
    py: Python<'py>,
    raw: &[u8],
    context_name: &str,
    limit: usize,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let encoded = only_part(raw, 1, None)
        .and_then(|trigger| encode_recipients(trigger, 6, context_name, limit));
    to_list(py, encoded)
}

#[pymodule]
fn canvas_gateway_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(encode_chunk, module)?)?;
    module.add_function(wrap_pyfunction!(encode_send, module)?)?;
    Ok(())
}
