//! The IPVS client: a generic netlink socket bound to the "IPVS" family, one request at a
//! time.

use super::attr::{genl_reply, Attrs, Writer};
use super::codec::{
    self, request, CMD_DEL_DEST, CMD_DEL_SERVICE, CMD_FLUSH, CMD_GET_CONFIG, CMD_GET_DEST,
    CMD_GET_INFO, CMD_GET_SERVICE, CMD_NEW_DEST, CMD_NEW_SERVICE, CMD_SET_DEST, CMD_SET_SERVICE,
};
use super::types::{RealServer, Timeouts, Version, VirtualServer};
use super::IpvsError;
use crate::netlink::{NetlinkError, NetlinkSocket, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

const NETLINK_GENERIC: i32 = 16;
/// The generic netlink controller, which names families' ids.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_VERSION: u8 = 2;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const IPVS_GENL_NAME: &str = "IPVS";

/// IPVS of the network namespace the socket was opened in. One request at a time: it can
/// move between threads (`Send`) but not be shared by them.
pub struct Ipvs {
    socket: NetlinkSocket,
    /// The id the kernel gave the "IPVS" family when the module loaded.
    family: u16,
}

impl Ipvs {
    /// Opens IPVS in the calling thread's network namespace, which the client keeps
    /// whatever thread uses it later. [`IpvsError::NotAvailable`] without IPVS in the kernel.
    pub fn open() -> Result<Self, IpvsError> {
        let socket = NetlinkSocket::open(NETLINK_GENERIC).map_err(|source| IpvsError::Netlink {
            op: "open a generic netlink socket".into(),
            source,
        })?;
        let mut w = Writer::new(CTRL_CMD_GETFAMILY, CTRL_VERSION);
        w.put_str(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME);
        let mut family = None;
        let mut bad = None;
        let sent = socket.request(
            GENL_ID_CTRL,
            NLM_F_REQUEST | NLM_F_ACK,
            &w.into_bytes(),
            |_, body| match genl_reply(body)
                .and_then(|(_, a)| a.u16(CTRL_ATTR_FAMILY_ID, "family id"))
            {
                Ok(id) => family = Some(id),
                Err(e) => bad = Some(e),
            },
        );
        match sent {
            Err(NetlinkError::Kernel(libc::ENOENT)) => return Err(IpvsError::NotAvailable),
            Err(e) => return Err(failed(|| "look up the generic netlink family".into(), e)),
            Ok(()) => {}
        }
        if let Some(e) = bad {
            return Err(e);
        }
        let family = family.ok_or_else(|| {
            IpvsError::Malformed("the controller acknowledged without a family id".into())
        })?;
        Ok(Self { socket, family })
    }

    /// Every virtual server with an address (firewall-mark ones are left out).
    pub fn services(&self) -> Result<Vec<VirtualServer>, IpvsError> {
        let mut out = Vec::new();
        self.dump(
            request(CMD_GET_SERVICE),
            || "list virtual servers".into(),
            |a| {
                out.extend(codec::parse_service(a)?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    pub fn add_service(&self, vs: &VirtualServer) -> Result<(), IpvsError> {
        let w = codec::service(CMD_NEW_SERVICE, vs, true)?;
        self.exec(w, || format!("add virtual server {vs}"))
    }

    /// Sets scheduler, flags, persistence and netmask of the virtual server `vs` names.
    pub fn update_service(&self, vs: &VirtualServer) -> Result<(), IpvsError> {
        let w = codec::service(CMD_SET_SERVICE, vs, true)?;
        self.exec(w, || format!("update virtual server {vs}"))
    }

    /// Deletes the virtual server and its real servers.
    pub fn delete_service(&self, vs: &VirtualServer) -> Result<(), IpvsError> {
        let w = codec::service(CMD_DEL_SERVICE, vs, false)?;
        self.exec(w, || format!("delete virtual server {vs}"))
    }

    /// The real servers of `vs` (none if there is no such virtual server: the kernel's dump
    /// says nothing then).
    pub fn destinations(&self, vs: &VirtualServer) -> Result<Vec<RealServer>, IpvsError> {
        let mut out = Vec::new();
        let family = vs.family();
        self.dump(
            codec::service(CMD_GET_DEST, vs, false)?,
            || format!("list real servers of {vs}"),
            |a| {
                out.push(codec::parse_destination(a, family)?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    pub fn add_destination(&self, vs: &VirtualServer, rs: &RealServer) -> Result<(), IpvsError> {
        let w = codec::destination(CMD_NEW_DEST, vs, rs, true)?;
        self.exec(w, || format!("add real server {rs} to {vs}"))
    }

    /// Sets weight, forwarding and thresholds; weight 0 drains the real server.
    pub fn update_destination(&self, vs: &VirtualServer, rs: &RealServer) -> Result<(), IpvsError> {
        let w = codec::destination(CMD_SET_DEST, vs, rs, true)?;
        self.exec(w, || format!("update real server {rs} of {vs}"))
    }

    pub fn delete_destination(&self, vs: &VirtualServer, rs: &RealServer) -> Result<(), IpvsError> {
        let w = codec::destination(CMD_DEL_DEST, vs, rs, false)?;
        self.exec(w, || format!("delete real server {rs} of {vs}"))
    }

    /// Deletes every virtual server of the namespace, kpr's or not.
    pub fn flush(&self) -> Result<(), IpvsError> {
        self.exec(request(CMD_FLUSH), || "flush".into())
    }

    pub fn timeouts(&self) -> Result<Timeouts, IpvsError> {
        self.get(
            request(CMD_GET_CONFIG),
            || "read timeouts".into(),
            codec::parse_timeouts,
        )
    }

    /// Sets the timeouts; a 0 leaves that one as it is.
    pub fn set_timeouts(&self, t: &Timeouts) -> Result<(), IpvsError> {
        self.exec(codec::set_timeouts(t), || "set timeouts".into())
    }

    pub fn version(&self) -> Result<Version, IpvsError> {
        self.get(
            request(CMD_GET_INFO),
            || "read version".into(),
            codec::parse_version,
        )
    }

    /// A request the kernel only acknowledges.
    fn exec(&self, w: Writer, op: impl Fn() -> String) -> Result<(), IpvsError> {
        self.socket
            .request(
                self.family,
                NLM_F_REQUEST | NLM_F_ACK,
                &w.into_bytes(),
                |_, _| {},
            )
            .map_err(|e| failed(op, e))
    }

    /// A request with one reply, read by `parse`.
    fn get<T>(
        &self,
        w: Writer,
        op: impl Fn() -> String,
        parse: impl Fn(&Attrs<'_>) -> Result<T, IpvsError>,
    ) -> Result<T, IpvsError> {
        let mut out = None;
        self.replies(w, NLM_F_ACK, &op, |a| {
            out = Some(parse(a)?);
            Ok(())
        })?;
        out.ok_or_else(|| IpvsError::Malformed(format!("{}: no reply", op())))
    }

    fn dump(
        &self,
        w: Writer,
        op: impl Fn() -> String,
        each: impl FnMut(&Attrs<'_>) -> Result<(), IpvsError>,
    ) -> Result<(), IpvsError> {
        self.replies(w, NLM_F_DUMP, &op, each)
    }

    /// Sends `w` and hands `each` the attributes of every IPVS reply; the first error (of the
    /// socket, of the kernel or of `each`) is returned once the kernel is done, so the socket
    /// is never left with replies of an old request.
    fn replies(
        &self,
        w: Writer,
        flags: u16,
        op: &impl Fn() -> String,
        mut each: impl FnMut(&Attrs<'_>) -> Result<(), IpvsError>,
    ) -> Result<(), IpvsError> {
        let mut bad = None;
        let family = self.family;
        self.socket
            .request(
                family,
                NLM_F_REQUEST | flags,
                &w.into_bytes(),
                |kind, body| {
                    if kind != family || bad.is_some() {
                        return;
                    }
                    if let Err(e) = genl_reply(body).and_then(|(_, a)| each(&a)) {
                        bad = Some(e);
                    }
                },
            )
            .map_err(|e| failed(op, e))?;
        bad.map_or(Ok(()), Err)
    }
}

fn failed(op: impl Fn() -> String, e: NetlinkError) -> IpvsError {
    match e {
        NetlinkError::Kernel(errno) => IpvsError::Kernel { op: op(), errno },
        source => IpvsError::Netlink { op: op(), source },
    }
}
