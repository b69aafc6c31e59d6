//! Netlink attributes (`struct nlattr`) behind a generic netlink header (`struct
//! genlmsghdr`): written for requests, read from replies without trusting any length the
//! kernel sends.

use super::IpvsError;

/// Marks an attribute whose payload is itself attributes. The kernel's IPVS parser accepts
/// nests with or without it; it is set because that is what the flag means.
const NLA_F_NESTED: u16 = 1 << 15;
/// The type bits of `nla_type` (without the nested and byte-order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_HDRLEN: usize = 4;
/// `struct genlmsghdr`: cmd, version, reserved u16.
const GENL_HDRLEN: usize = 4;

/// A generic netlink message body under construction: the header, then attributes, each
/// padded to 4 bytes as netlink requires.
pub(super) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(super) fn new(cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self { buf }
    }

    pub(super) fn put(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        self.header(kind, NLA_HDRLEN + data.len());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub(super) fn put_u16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    pub(super) fn put_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A port, which IPVS keeps in network byte order.
    pub(super) fn put_be16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.put(kind, &value.to_be_bytes())
    }

    /// A NUL-terminated string (`NLA_NUL_STRING`).
    pub(super) fn put_str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut data = Vec::with_capacity(value.len() + 1);
        data.extend_from_slice(value.as_bytes());
        data.push(0);
        self.put(kind, &data)
    }

    /// An attribute holding the attributes `fill` writes.
    pub(super) fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.header(kind | NLA_F_NESTED, 0);
        fill(self);
        let len = self.buf.len() - start;
        // Requests are a few hundred bytes at most, far below the u16 length limit.
        self.buf[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
        self
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn header(&mut self, kind: u16, len: usize) {
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }
}

/// The command and the attributes of one generic netlink reply.
pub(super) fn genl_reply(payload: &[u8]) -> Result<(u8, Attrs<'_>), IpvsError> {
    let Some((header, attrs)) = payload.split_at_checked(GENL_HDRLEN) else {
        return Err(malformed(format!(
            "generic netlink message of {} bytes, shorter than its header",
            payload.len()
        )));
    };
    Ok((header[0], Attrs::parse(attrs)?))
}

/// The attributes of one level, by type. A type the kernel repeats keeps its last value, as
/// the kernel's own parser does.
#[derive(Debug)]
pub(super) struct Attrs<'a> {
    attrs: Vec<(u16, &'a [u8])>,
}

impl<'a> Attrs<'a> {
    pub(super) fn parse(mut rest: &'a [u8]) -> Result<Self, IpvsError> {
        let mut attrs = Vec::new();
        while !rest.is_empty() {
            let (len, kind) = match rest {
                [l0, l1, t0, t1, ..] => (
                    usize::from(u16::from_ne_bytes([*l0, *l1])),
                    u16::from_ne_bytes([*t0, *t1]),
                ),
                _ => {
                    return Err(malformed(format!(
                        "{} trailing bytes, too short for an attribute",
                        rest.len()
                    )))
                }
            };
            let Some(data) = rest.get(NLA_HDRLEN..len) else {
                return Err(malformed(format!(
                    "attribute {} claims {len} bytes, {} are there",
                    kind & NLA_TYPE_MASK,
                    rest.len()
                )));
            };
            attrs.push((kind & NLA_TYPE_MASK, data));
            // The last attribute's padding may be missing from a message.
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
        Ok(Self { attrs })
    }

    pub(super) fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.attrs
            .iter()
            .rev()
            .find(|(k, _)| *k == kind)
            .map(|(_, data)| *data)
    }

    /// The attribute `kind` (named `name` in errors), which must be there.
    pub(super) fn require(&self, kind: u16, name: &str) -> Result<&'a [u8], IpvsError> {
        self.get(kind)
            .ok_or_else(|| malformed(format!("no {name} attribute")))
    }

    pub(super) fn nested(&self, kind: u16, name: &str) -> Result<Attrs<'a>, IpvsError> {
        Attrs::parse(self.require(kind, name)?)
    }

    pub(super) fn u16(&self, kind: u16, name: &str) -> Result<u16, IpvsError> {
        fixed(self.require(kind, name)?, name).map(u16::from_ne_bytes)
    }

    pub(super) fn u32(&self, kind: u16, name: &str) -> Result<u32, IpvsError> {
        fixed(self.require(kind, name)?, name).map(u32::from_ne_bytes)
    }

    /// An optional u32 (absent on older kernels).
    pub(super) fn opt_u32(&self, kind: u16, name: &str) -> Result<Option<u32>, IpvsError> {
        self.get(kind)
            .map(|data| fixed(data, name).map(u32::from_ne_bytes))
            .transpose()
    }

    pub(super) fn be16(&self, kind: u16, name: &str) -> Result<u16, IpvsError> {
        fixed(self.require(kind, name)?, name).map(u16::from_be_bytes)
    }

    /// A NUL-terminated string; what follows the first NUL is ignored.
    pub(super) fn string(&self, kind: u16, name: &str) -> Result<String, IpvsError> {
        let data = self.require(kind, name)?;
        let text = data.split(|b| *b == 0).next().unwrap_or_default();
        String::from_utf8(text.to_vec()).map_err(|_| malformed(format!("{name} is not UTF-8")))
    }
}

/// Exactly `N` bytes: the kernel writes fixed-size values at their size, so any other length
/// means the reply is not what this code understands.
pub(super) fn fixed<const N: usize>(data: &[u8], name: &str) -> Result<[u8; N], IpvsError> {
    data.try_into().map_err(|_| {
        malformed(format!(
            "{name} attribute has {} bytes, expected {N}",
            data.len()
        ))
    })
}

/// The first `N` bytes, for values the kernel stores in a larger field (an IPv4 address in
/// 16 bytes, the flags before their mask).
pub(super) fn leading<const N: usize>(data: &[u8]) -> Option<[u8; N]> {
    data.get(..N)?.try_into().ok()
}

pub(super) fn malformed(what: String) -> IpvsError {
    IpvsError::Malformed(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes_and_lengths_exclude_padding() {
        let mut w = Writer::new(7, 1);
        w.put(1, &[0xaa]).put_u16(2, 0x0102).put_str(3, "rr");
        let b = w.into_bytes();
        let ne = |v: u16| v.to_ne_bytes();
        let mut want = vec![7, 1, 0, 0];
        want.extend(ne(5));
        want.extend(ne(1));
        want.extend([0xaa, 0, 0, 0]);
        want.extend(ne(6));
        want.extend(ne(2));
        want.extend(ne(0x0102));
        want.extend([0, 0]);
        want.extend(ne(7));
        want.extend(ne(3));
        want.extend(*b"rr\0\0");
        assert_eq!(b, want);
    }

    #[test]
    fn ports_are_written_in_network_order() {
        let mut w = Writer::new(0, 0);
        w.put_be16(4, 8080);
        assert_eq!(&w.into_bytes()[8..10], &[0x1f, 0x90]);
    }

    #[test]
    fn a_nest_covers_its_children_and_carries_the_nested_flag() {
        let mut w = Writer::new(1, 1);
        w.nest(1, |w| {
            w.put_u32(2, 9).put_u16(3, 4);
        })
        .put_u32(4, 5);
        let b = w.into_bytes();
        let (cmd, top) = genl_reply(&b).unwrap();
        assert_eq!(cmd, 1);
        // Nest header (4) + u32 attr (8) + u16 attr padded (8).
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 20);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 1 | NLA_F_NESTED);
        let inner = top.nested(1, "nest").unwrap();
        assert_eq!(inner.u32(2, "a").unwrap(), 9);
        assert_eq!(inner.u16(3, "b").unwrap(), 4);
        assert_eq!(top.u32(4, "c").unwrap(), 5);
    }

    #[test]
    fn the_last_attribute_may_lack_its_padding() {
        let mut data = Vec::new();
        data.extend(5u16.to_ne_bytes());
        data.extend(1u16.to_ne_bytes());
        data.push(0x42);
        let attrs = Attrs::parse(&data).unwrap();
        assert_eq!(attrs.get(1), Some(&[0x42][..]));
    }

    #[test]
    fn truncated_or_lying_attributes_are_errors() {
        // A length past the end, a length shorter than the header, stray trailing bytes.
        for bytes in [
            [&9u16.to_ne_bytes()[..], &1u16.to_ne_bytes(), &[1, 2]].concat(),
            [&2u16.to_ne_bytes()[..], &1u16.to_ne_bytes()].concat(),
            [&4u16.to_ne_bytes()[..], &1u16.to_ne_bytes(), &[0, 0]].concat(),
        ] {
            assert!(
                matches!(Attrs::parse(&bytes), Err(IpvsError::Malformed(_))),
                "{bytes:?}"
            );
        }
        assert!(genl_reply(&[1, 2]).is_err());
    }

    #[test]
    fn wrong_sizes_and_missing_attributes_are_errors() {
        let mut w = Writer::new(0, 0);
        w.put(1, &[1, 2, 3]).put(2, &[0xff, 0xfe]);
        let b = w.into_bytes();
        let (_, attrs) = genl_reply(&b).unwrap();
        assert!(attrs.u32(1, "x").is_err());
        assert!(attrs.u16(9, "absent").is_err());
        assert!(attrs.opt_u32(9, "absent").unwrap().is_none());
        assert!(attrs.string(2, "bad utf-8").is_err());
        assert!(attrs.nested(1, "not a nest").is_err());
    }

    #[test]
    fn strings_stop_at_the_first_nul() {
        let mut w = Writer::new(0, 0);
        w.put(1, b"mh\0junk");
        let b = w.into_bytes();
        let (_, attrs) = genl_reply(&b).unwrap();
        assert_eq!(attrs.string(1, "s").unwrap(), "mh");
    }
}
