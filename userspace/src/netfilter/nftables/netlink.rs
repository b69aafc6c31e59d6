//! The nftables mode's transactions as nfnetlink messages: every [`Op`] becomes libnftnl
//! objects (tables, chains, rules of raw expressions, sets, elements), all in one batch that the
//! kernel applies atomically. The expressions are the ones `nft` itself generates for the same
//! syntax, so that `nft list ruleset` shows exactly kube-proxy's rules (checked by loading
//! kube-proxy's expected rulesets with the real `nft -f` beside kpr's and comparing listings).

use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::net::IpAddr;
use std::os::raw::c_char;

use ipnet::IpNet;

use nftnl::nftnl_sys as sys;
use nftnl::{MsgType, NlMsg};

use super::ruleset::{
    Addr, ChainType, Element, ElementKey, Hook, Key, Rule, Ruleset, Stmt, Verdict, TABLE,
};
use super::sync::Op;
use crate::model::Family;
use crate::netfilter::nfnetlink::{
    Attr, RawExpr, Transaction, ICMP_PORT_UNREACH, NFT_CMP_EQ, NFT_META_IIFNAME, NFT_META_L4PROTO,
    NFT_META_MARK, NFT_MSG_DELSETELEM, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER,
    NFT_REJECT_ICMP_UNREACH, NF_NAT_RANGE_PROTO_RANDOM_FULLY, NLM_F_ACK, TYPE_BITS,
    TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_IPADDR,
};

// linux/netfilter/nf_tables.h
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

const NFT_REG_VERDICT: u32 = 0;
/// The first 32-bit register; a concatenation takes consecutive ones.
const NFT_REG32_00: u32 = 8;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CT_STATE: u32 = 0;
/// `NF_CT_STATE_BIT(IP_CT_NEW)`.
const CT_STATE_NEW: u32 = 1 << 3;
const NFTA_FIB_F_SADDR: u32 = 1;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const RTN_LOCAL: u32 = 2;
const NFT_NG_RANDOM: u32 = 1;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFT_LOOKUP_F_INV: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;

const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// nft's datatypes and its composition of a concatenation's type (6 bits per field).
const TYPE_INTEGER: u32 = 4;
const TYPE_IP6ADDR: u32 = 8;

// libnftnl's userdata types: the comment of each kind of object.
const UDATA_TABLE_COMMENT: u8 = 0;
const UDATA_CHAIN_COMMENT: u8 = 0;
const UDATA_RULE_COMMENT: u8 = 0;
const UDATA_SET_COMMENT: u8 = 7;
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const BYTEORDER_HOST_ENDIAN: u32 = 1;
const UDATA_SET_ELEM_COMMENT: u8 = 0;

/// One userdata TLV holding a comment (NUL-terminated, as nft writes it).
fn comment_udata(ty: u8, comment: &str) -> Vec<u8> {
    let mut v = comment.as_bytes().to_vec();
    v.truncate(126);
    v.push(0);
    let mut out = vec![ty, v.len() as u8];
    out.extend(v);
    out
}

fn family_proto(f: Family) -> u16 {
    match f {
        Family::V4 => NFPROTO_IPV4 as u16,
        Family::V6 => NFPROTO_IPV6 as u16,
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// A key element of a set: (address, protocol, port) fields each padded to 4 bytes.
fn key_bytes(k: &ElementKey) -> Vec<u8> {
    let addr = |ip: &IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let proto = |p: crate::model::Protocol| vec![p.number(), 0, 0, 0];
    let port = |p: u16| {
        let b = p.to_be_bytes();
        vec![b[0], b[1], 0, 0]
    };
    match k {
        ElementKey::Addr(ip) => addr(ip),
        ElementKey::ProtoPort(p, n) => [proto(*p), port(*n)].concat(),
        ElementKey::AddrProtoPort(ip, p, n) => [addr(ip), proto(*p), port(*n)].concat(),
    }
}

fn key_spec(family: Family, key: Key) -> (u32, u32) {
    let (addr_type, addr_len) = match family {
        Family::V4 => (TYPE_IPADDR, 4),
        Family::V6 => (TYPE_IP6ADDR, 16),
    };
    let concat = |types: &[u32]| types.iter().fold(0, |acc, t| (acc << TYPE_BITS) | t);
    match key {
        Key::Addr => (addr_type, addr_len),
        Key::ProtoPort => (concat(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]), 8),
        Key::AddrProtoPort => (
            concat(&[addr_type, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            addr_len + 8,
        ),
    }
}

/// A verdict as (code, chain).
fn verdict_code(v: &Verdict) -> (i32, Option<&str>) {
    match v {
        Verdict::Accept => (NF_ACCEPT, None),
        Verdict::Drop => (NF_DROP, None),
        Verdict::Return => (NFT_RETURN, None),
        Verdict::Jump(c) => (NFT_JUMP, Some(c)),
        Verdict::Goto(c) => (NFT_GOTO, Some(c)),
        // `reject` is a statement, not a verdict; maps refer to reject-chain instead.
        Verdict::Reject => (NF_DROP, None),
    }
}

/// One element of a set message.
struct Elem {
    key: Vec<u8>,
    flags: u32,
    verdict: Option<(i32, Option<CString>)>,
    comment: Option<Vec<u8>>,
}

impl Elem {
    fn of(e: &Element) -> Elem {
        Elem {
            key: key_bytes(&e.key),
            flags: 0,
            verdict: e.verdict.as_ref().map(|v| {
                let (code, chain) = verdict_code(v);
                (code, chain.map(cstr))
            }),
            comment: e
                .comment
                .as_deref()
                .map(|c| comment_udata(UDATA_SET_ELEM_COMMENT, c)),
        }
    }
}

/// A set's definition.
struct SetDef {
    name: CString,
    id: u32,
    /// nft's `NFTNL_UDATA_SET_KEYBYTEORDER`: how `nft list` reads the keys (integers in host
    /// byte order, as `numgen` produces them).
    key_host_order: bool,
    flags: u32,
    key_type: u32,
    key_len: u32,
    verdict_map: bool,
    timeout_ms: Option<u64>,
    comment: Option<Vec<u8>>,
}

/// One nfnetlink message of the batch.
enum Msg {
    Table {
        del: bool,
        comment: Option<Vec<u8>>,
    },
    Chain {
        name: CString,
        base: Option<(u32, i32, CString)>,
        comment: Option<Vec<u8>>,
        del: bool,
    },
    FlushChain(CString),
    Rule {
        chain: CString,
        exprs: Vec<RawExpr>,
        comment: Option<Vec<u8>>,
    },
    NewSet(SetDef),
    DelSet(CString),
    Elems {
        set: CString,
        set_id: Option<u32>,
        elems: Vec<Elem>,
        del: bool,
    },
}

struct Message {
    family: u16,
    table: CString,
    msg: Msg,
}

// SAFETY: every message is built into libnftnl's batch buffer, which holds a message of up to
// nft_nlmsg_maxsize(); the objects are allocated, filled, serialised and freed here.
unsafe impl NlMsg for Message {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        let buf = buf.cast::<c_char>();
        let hdr = |ty: u16, flags: u16| unsafe {
            sys::nftnl_nlmsg_build_hdr(buf, ty, self.family, flags | NLM_F_ACK, seq)
        };
        unsafe {
            match &self.msg {
                Msg::Table { del, comment } => {
                    let t = sys::nftnl_table_alloc();
                    sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, self.table.as_ptr());
                    if let Some(c) = comment {
                        sys::nftnl_table_set_data(
                            t,
                            sys::NFTNL_TABLE_USERDATA as u16,
                            c.as_ptr().cast(),
                            c.len() as u32,
                        );
                    }
                    let nlh = if *del {
                        hdr(NFT_MSG_DELTABLE, 0)
                    } else {
                        hdr(NFT_MSG_NEWTABLE, NLM_F_CREATE)
                    };
                    sys::nftnl_table_nlmsg_build_payload(nlh, t);
                    sys::nftnl_table_free(t);
                }
                Msg::Chain {
                    name,
                    base,
                    comment,
                    del,
                } => {
                    let c = sys::nftnl_chain_alloc();
                    sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, self.table.as_ptr());
                    sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
                    if let Some((hook, prio, ty)) = base {
                        sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16, *hook);
                        sys::nftnl_chain_set_s32(c, sys::NFTNL_CHAIN_PRIO as u16, *prio);
                        sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TYPE as u16, ty.as_ptr());
                        sys::nftnl_chain_set_u32(
                            c,
                            sys::NFTNL_CHAIN_POLICY as u16,
                            NF_ACCEPT as u32,
                        );
                    }
                    if let Some(cm) = comment {
                        sys::nftnl_chain_set_data(
                            c,
                            sys::NFTNL_CHAIN_USERDATA as u16,
                            cm.as_ptr().cast(),
                            cm.len() as u32,
                        );
                    }
                    let nlh = if *del {
                        hdr(NFT_MSG_DELCHAIN, 0)
                    } else {
                        hdr(NFT_MSG_NEWCHAIN, NLM_F_CREATE)
                    };
                    sys::nftnl_chain_nlmsg_build_payload(nlh, c);
                    sys::nftnl_chain_free(c);
                }
                Msg::FlushChain(chain) => {
                    let r = sys::nftnl_rule_alloc();
                    sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, self.table.as_ptr());
                    sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
                    let nlh = hdr(NFT_MSG_DELRULE, 0);
                    sys::nftnl_rule_nlmsg_build_payload(nlh, r);
                    sys::nftnl_rule_free(r);
                }
                Msg::Rule {
                    chain,
                    exprs,
                    comment,
                } => {
                    let r = sys::nftnl_rule_alloc();
                    sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, self.table.as_ptr());
                    sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
                    for e in exprs {
                        sys::nftnl_rule_add_expr(r, e.alloc().as_ptr());
                    }
                    if let Some(c) = comment {
                        sys::nftnl_rule_set_data(
                            r,
                            sys::NFTNL_RULE_USERDATA as u16,
                            c.as_ptr().cast(),
                            c.len() as u32,
                        );
                    }
                    let nlh = hdr(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
                    sys::nftnl_rule_nlmsg_build_payload(nlh, r);
                    sys::nftnl_rule_free(r);
                }
                Msg::NewSet(d) => {
                    let s = sys::nftnl_set_alloc();
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, self.table.as_ptr());
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, d.name.as_ptr());
                    sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, d.id);
                    sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, self.family.into());
                    sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, d.flags);
                    sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, d.key_type);
                    sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, d.key_len);
                    if d.verdict_map {
                        sys::nftnl_set_set_u32(
                            s,
                            sys::NFTNL_SET_DATA_TYPE as u16,
                            NFT_DATA_VERDICT,
                        );
                    }
                    if let Some(t) = d.timeout_ms {
                        sys::nftnl_set_set_u64(s, sys::NFTNL_SET_TIMEOUT as u16, t);
                    }
                    let mut udata = Vec::new();
                    if d.key_host_order {
                        udata.extend([UDATA_SET_KEYBYTEORDER, 4]);
                        udata.extend(BYTEORDER_HOST_ENDIAN.to_ne_bytes());
                    }
                    if let Some(c) = &d.comment {
                        udata.extend(c);
                    }
                    if !udata.is_empty() {
                        sys::nftnl_set_set_data(
                            s,
                            sys::NFTNL_SET_USERDATA as u16,
                            udata.as_ptr().cast(),
                            udata.len() as u32,
                        );
                    }
                    let nlh = hdr(NFT_MSG_NEWSET, NLM_F_CREATE);
                    sys::nftnl_set_nlmsg_build_payload(nlh, s);
                    sys::nftnl_set_free(s);
                }
                Msg::DelSet(name) => {
                    let s = sys::nftnl_set_alloc();
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, self.table.as_ptr());
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
                    let nlh = hdr(NFT_MSG_DELSET, 0);
                    sys::nftnl_set_nlmsg_build_payload(nlh, s);
                    sys::nftnl_set_free(s);
                }
                Msg::Elems {
                    set,
                    set_id,
                    elems,
                    del,
                } => {
                    let s = sys::nftnl_set_alloc();
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, self.table.as_ptr());
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, set.as_ptr());
                    if let Some(id) = set_id {
                        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, *id);
                    }
                    for el in elems {
                        let e = sys::nftnl_set_elem_alloc();
                        sys::nftnl_set_elem_set(
                            e,
                            sys::NFTNL_SET_ELEM_KEY as u16,
                            el.key.as_ptr().cast(),
                            el.key.len() as u32,
                        );
                        if el.flags != 0 {
                            sys::nftnl_set_elem_set_u32(
                                e,
                                sys::NFTNL_SET_ELEM_FLAGS as u16,
                                el.flags,
                            );
                        }
                        if let Some((code, chain)) = &el.verdict {
                            sys::nftnl_set_elem_set_u32(
                                e,
                                sys::NFTNL_SET_ELEM_VERDICT as u16,
                                *code as u32,
                            );
                            if let Some(c) = chain {
                                sys::nftnl_set_elem_set_str(
                                    e,
                                    sys::NFTNL_SET_ELEM_CHAIN as u16,
                                    c.as_ptr(),
                                );
                            }
                        }
                        if let Some(c) = &el.comment {
                            sys::nftnl_set_elem_set(
                                e,
                                sys::NFTNL_SET_ELEM_USERDATA as u16,
                                c.as_ptr().cast(),
                                c.len() as u32,
                            );
                        }
                        sys::nftnl_set_elem_add(s, e);
                    }
                    let nlh = if *del {
                        hdr(NFT_MSG_DELSETELEM, 0)
                    } else {
                        hdr(NFT_MSG_NEWSETELEM, NLM_F_CREATE)
                    };
                    sys::nftnl_set_elems_nlmsg_build_payload(nlh, s);
                    sys::nftnl_set_free(s);
                }
            }
        }
    }
}

/// Builds the batch: the messages of `ops`, with `target` for the definitions they refer to.
pub struct Encoder<'a> {
    target: &'a Ruleset,
    family: u16,
    table: CString,
    /// The table's name, for the messages' descriptions.
    table_name: &'static str,
    txn: Transaction,
    /// Sets created in this batch, by name: rules and elements refer to them by id too.
    set_ids: BTreeMap<String, u32>,
    next_id: u32,
}

impl<'a> Encoder<'a> {
    /// The transaction that writes `target` into kube-proxy's table.
    pub fn new(target: &'a Ruleset) -> Encoder<'a> {
        Encoder::for_table(target, TABLE)
    }

    /// The same into the table `table` (the eBPF mode's SCTP table).
    pub fn for_table(target: &'a Ruleset, table: &'static str) -> Encoder<'a> {
        Encoder {
            target,
            family: family_proto(target.family),
            table: cstr(table),
            table_name: table,
            txn: Transaction::new(),
            set_ids: BTreeMap::new(),
            next_id: 1,
        }
    }

    fn push(&mut self, msg: Msg, what: impl FnOnce() -> String) {
        let m = Message {
            family: self.family,
            table: self.table.clone(),
            msg,
        };
        self.txn.add(&m, MsgType::Add, what);
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The transaction for `ops`.
    pub fn encode(mut self, ops: &[Op]) -> Transaction {
        let fam = self.target.family_name();
        let table = self.table_name;
        for op in ops {
            match op {
                Op::ReplaceTable => {
                    let comment = Some(comment_udata(UDATA_TABLE_COMMENT, &self.target.comment));
                    // `add` first so that `delete` cannot fail when there is no table yet.
                    self.push(
                        Msg::Table {
                            del: false,
                            comment: None,
                        },
                        || format!("add table {fam} {table}"),
                    );
                    self.push(
                        Msg::Table {
                            del: true,
                            comment: None,
                        },
                        || format!("delete table {fam} {table}"),
                    );
                    self.push(
                        Msg::Table {
                            del: false,
                            comment,
                        },
                        || format!("add table {fam} {table}"),
                    );
                }
                Op::AddChain(name) => {
                    let c = &self.target.chains[name];
                    let base = c.base.map(|b| {
                        let hook = match b.hook {
                            Hook::Prerouting => 0,
                            Hook::Input => 1,
                            Hook::Forward => 2,
                            Hook::Output => 3,
                            Hook::Postrouting => 4,
                        };
                        let ty = match b.ty {
                            ChainType::Filter => cstr("filter"),
                            ChainType::Nat => cstr("nat"),
                        };
                        (hook, b.priority, ty)
                    });
                    let comment = c
                        .comment
                        .as_deref()
                        .map(|cm| comment_udata(UDATA_CHAIN_COMMENT, cm));
                    self.push(
                        Msg::Chain {
                            name: cstr(name),
                            base,
                            comment,
                            del: false,
                        },
                        || format!("add chain {fam} {table} {name}"),
                    );
                }
                Op::FlushChain(name) => self.push(Msg::FlushChain(cstr(name)), || {
                    format!("flush chain {fam} {table} {name}")
                }),
                Op::DeleteChain(name) => self.push(
                    Msg::Chain {
                        name: cstr(name),
                        base: None,
                        comment: None,
                        del: true,
                    },
                    || format!("delete chain {fam} {table} {name}"),
                ),
                Op::AddRule(chain, rule) => self.rule(chain, rule),
                Op::AddSet(name) => {
                    let s = &self.target.sets[name];
                    let (key_type, key_len) = key_spec(self.target.family, s.key);
                    let mut flags = 0;
                    if s.verdict_map {
                        flags |= NFT_SET_MAP;
                    }
                    if s.timeout_s.is_some() {
                        flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL;
                    }
                    let id = self.id();
                    self.set_ids.insert(name.clone(), id);
                    let def = SetDef {
                        name: cstr(name),
                        id,
                        key_host_order: false,
                        flags,
                        key_type,
                        key_len,
                        verdict_map: s.verdict_map,
                        timeout_ms: s.timeout_s.map(|t| t * 1000),
                        comment: s
                            .comment
                            .as_deref()
                            .map(|c| comment_udata(UDATA_SET_COMMENT, c)),
                    };
                    self.push(Msg::NewSet(def), || format!("add set {fam} {table} {name}"));
                }
                Op::DeleteSet(name) => self.push(Msg::DelSet(cstr(name)), || {
                    format!("delete set {fam} {table} {name}")
                }),
                Op::AddElement(set, e) => {
                    let set_id = self.set_ids.get(set).copied();
                    self.push(
                        Msg::Elems {
                            set: cstr(set),
                            set_id,
                            elems: vec![Elem::of(e)],
                            del: false,
                        },
                        || format!("add element {fam} {table} {set} {{ {} }}", e.key),
                    );
                }
                Op::DeleteElement(set, k) => self.push(
                    Msg::Elems {
                        set: cstr(set),
                        set_id: None,
                        elems: vec![Elem {
                            key: key_bytes(k),
                            flags: 0,
                            verdict: None,
                            comment: None,
                        }],
                        del: true,
                    },
                    || format!("delete element {fam} {table} {set} {{ {k} }}"),
                ),
            }
        }
        self.txn
    }

    /// An anonymous set (or verdict map) bound to the next rule, with its elements: its name and id.
    fn anonymous(&mut self, def: (u32, u32, u32, bool), elems: Vec<Elem>) -> (CString, u32) {
        let (flags, key_type, key_len, verdict_map) = def;
        let id = self.id();
        let name = cstr("__set%d");
        self.push(
            Msg::NewSet(SetDef {
                name: name.clone(),
                id,
                key_host_order: key_type == TYPE_INTEGER,
                flags: NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | flags,
                key_type,
                key_len,
                verdict_map,
                timeout_ms: None,
                comment: None,
            }),
            || "add anonymous set".to_string(),
        );
        self.push(
            Msg::Elems {
                set: name.clone(),
                set_id: Some(id),
                elems,
                del: false,
            },
            || "add anonymous set elements".to_string(),
        );
        (name, id)
    }

    fn rule(&mut self, chain: &str, rule: &Rule) {
        let family = self.target.family;
        let mut exprs = Vec::new();
        for stmt in &rule.stmts {
            self.stmt(family, stmt, &mut exprs);
        }
        let comment = rule
            .comment
            .as_deref()
            .map(|c| comment_udata(UDATA_RULE_COMMENT, c));
        let text = self.target.rule_text(rule);
        let fam = self.target.family_name();
        let table = self.table_name;
        self.push(
            Msg::Rule {
                chain: cstr(chain),
                exprs,
                comment,
            },
            || format!("add rule {fam} {table} {chain} {text}"),
        );
    }

    fn stmt(&mut self, family: Family, stmt: &Stmt, out: &mut Vec<RawExpr>) {
        let r = NFT_REG32_00;
        let (addr_len, saddr_off, daddr_off) = match family {
            Family::V4 => (4u32, 12u32, 16u32),
            Family::V6 => (16, 8, 24),
        };
        let addr_load = |a: Addr, dreg: u32| {
            let off = match a {
                Addr::Saddr => saddr_off,
                Addr::Daddr => daddr_off,
            };
            payload(NFT_PAYLOAD_NETWORK_HEADER, off, addr_len, dreg)
        };
        // The register after one holding `len` bytes.
        let next = |reg: u32, len: u32| reg + len.div_ceil(4);
        match stmt {
            Stmt::CtStateNew => {
                out.push(RawExpr::new(
                    c"ct",
                    vec![
                        (sys::NFTNL_EXPR_CT_KEY, Attr::U32(NFT_CT_STATE)),
                        (sys::NFTNL_EXPR_CT_DREG, Attr::U32(r)),
                    ],
                ));
                out.push(RawExpr::bitwise(r, &CT_STATE_NEW.to_ne_bytes(), &[0; 4]));
                out.push(cmp(NFT_CMP_NEQ, r, &[0; 4]));
            }
            Stmt::Prefix { addr, negate, net } => {
                out.push(addr_load(*addr, r));
                let len = net.prefix_len();
                if len < net.max_prefix_len() {
                    let mask = prefix_mask(addr_len as usize, len);
                    out.push(RawExpr::bitwise(r, &mask, &vec![0; mask.len()]));
                }
                let op = if *negate { NFT_CMP_NEQ } else { NFT_CMP_EQ };
                out.push(cmp(op, r, &ip_bytes(net.network())));
            }
            // nft compiles a one-element anonymous set to a plain match; so does kpr, so that
            // the kernel holds what `nft -f` would load.
            Stmt::PrefixSet { addr, negate, nets } if nets.len() == 1 => {
                self.stmt(
                    family,
                    &Stmt::Prefix {
                        addr: *addr,
                        negate: *negate,
                        net: nets[0],
                    },
                    out,
                );
            }
            Stmt::PrefixSet { addr, negate, nets } => {
                let (key_type, key_len) = key_spec(family, Key::Addr);
                let elems = interval_elements(nets);
                let (name, id) =
                    self.anonymous((NFT_SET_INTERVAL, key_type, key_len, false), elems);
                out.push(addr_load(*addr, r));
                out.push(lookup(r, None, &name, id, *negate));
            }
            Stmt::InSet { addr, set } => {
                out.push(addr_load(*addr, r));
                let id = self.set_ids.get(set).copied().unwrap_or(0);
                out.push(lookup(r, None, &cstr(set), id, false));
            }
            Stmt::FibSaddrLocal => {
                out.push(RawExpr::new(
                    c"fib",
                    vec![
                        (sys::NFTNL_EXPR_FIB_FLAGS, Attr::U32(NFTA_FIB_F_SADDR)),
                        (
                            sys::NFTNL_EXPR_FIB_RESULT,
                            Attr::U32(NFT_FIB_RESULT_ADDRTYPE),
                        ),
                        (sys::NFTNL_EXPR_FIB_DREG, Attr::U32(r)),
                    ],
                ));
                out.push(cmp(NFT_CMP_EQ, r, &RTN_LOCAL.to_ne_bytes()));
            }
            Stmt::Iifname {
                name,
                prefix,
                negate,
            } => {
                // As nft encodes it: a name is compared with its NUL (so "eth0" is not
                // "eth01"), a prefix ("veth*") without.
                out.push(RawExpr::meta_load(NFT_META_IIFNAME, r));
                let mut data = name.as_bytes().to_vec();
                if !*prefix {
                    data.push(0);
                }
                let op = if *negate { NFT_CMP_NEQ } else { NFT_CMP_EQ };
                out.push(cmp(op, r, &data));
            }
            Stmt::L4proto(p) => {
                out.push(RawExpr::meta_load(NFT_META_L4PROTO, r));
                out.push(cmp(NFT_CMP_EQ, r, &[p.number()]));
            }
            Stmt::MarkClear(m) => {
                out.push(RawExpr::meta_load(NFT_META_MARK, r));
                out.push(RawExpr::bitwise(r, &m.to_ne_bytes(), &[0; 4]));
                out.push(cmp(NFT_CMP_EQ, r, &[0; 4]));
            }
            Stmt::MarkOr(m) => {
                out.push(RawExpr::meta_load(NFT_META_MARK, r));
                out.push(RawExpr::bitwise(r, &(!m).to_ne_bytes(), &m.to_ne_bytes()));
                out.push(RawExpr::meta_store(NFT_META_MARK, r));
            }
            Stmt::MarkXor(m) => {
                out.push(RawExpr::meta_load(NFT_META_MARK, r));
                out.push(RawExpr::bitwise(
                    r,
                    &u32::MAX.to_ne_bytes(),
                    &m.to_ne_bytes(),
                ));
                out.push(RawExpr::meta_store(NFT_META_MARK, r));
            }
            Stmt::Vmap { key, map } => {
                let mut reg = r;
                if *key == Key::AddrProtoPort || *key == Key::Addr {
                    out.push(addr_load(Addr::Daddr, reg));
                    reg = next(reg, addr_len);
                }
                if *key != Key::Addr {
                    out.push(RawExpr::meta_load(NFT_META_L4PROTO, reg));
                    reg = next(reg, 1);
                    out.push(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg));
                }
                let id = self.set_ids.get(map).copied().unwrap_or(0);
                out.push(lookup(r, Some(NFT_REG_VERDICT), &cstr(map), id, false));
            }
            Stmt::NumgenVmap(targets) => {
                let elems = targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Elem {
                        key: (i as u32).to_ne_bytes().to_vec(),
                        flags: 0,
                        verdict: Some((NFT_GOTO, Some(cstr(t)))),
                        comment: None,
                    })
                    .collect();
                let (name, id) = self.anonymous((NFT_SET_MAP, TYPE_INTEGER, 4, true), elems);
                out.push(RawExpr::new(
                    c"numgen",
                    vec![
                        (sys::NFTNL_EXPR_NG_DREG, Attr::U32(r)),
                        (sys::NFTNL_EXPR_NG_MODULUS, Attr::U32(targets.len() as u32)),
                        (sys::NFTNL_EXPR_NG_TYPE, Attr::U32(NFT_NG_RANDOM)),
                        (sys::NFTNL_EXPR_NG_OFFSET, Attr::U32(0)),
                    ],
                ));
                out.push(lookup(r, Some(NFT_REG_VERDICT), &name, id, false));
            }
            Stmt::UpdateSaddr(set) => {
                out.push(addr_load(Addr::Saddr, r));
                let id = self.set_ids.get(set).copied().unwrap_or(0);
                out.push(RawExpr::new(
                    c"dynset",
                    vec![
                        (sys::NFTNL_EXPR_DYNSET_SREG_KEY, Attr::U32(r)),
                        (sys::NFTNL_EXPR_DYNSET_OP, Attr::U32(NFT_DYNSET_OP_UPDATE)),
                        (sys::NFTNL_EXPR_DYNSET_SET_NAME, Attr::Str(cstr(set))),
                        (sys::NFTNL_EXPR_DYNSET_SET_ID, Attr::U32(id)),
                    ],
                ));
            }
            Stmt::Dnat(b) => {
                let port_reg = next(r, addr_len);
                out.push(RawExpr::immediate(r, &ip_bytes(b.ip)));
                out.push(RawExpr::immediate(port_reg, &b.port.to_be_bytes()));
                out.push(RawExpr::new(
                    c"nat",
                    vec![
                        (sys::NFTNL_EXPR_NAT_TYPE, Attr::U32(NFT_NAT_DNAT)),
                        (
                            sys::NFTNL_EXPR_NAT_FAMILY,
                            Attr::U32(u32::from(family_proto(family))),
                        ),
                        (sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, Attr::U32(r)),
                        (sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, Attr::U32(port_reg)),
                    ],
                ));
            }
            Stmt::Masquerade => out.push(RawExpr::masquerade(NF_NAT_RANGE_PROTO_RANDOM_FULLY)),
            Stmt::Verdict(Verdict::Reject) => {
                let code = match family {
                    Family::V4 => ICMP_PORT_UNREACH,
                    Family::V6 => ICMPV6_PORT_UNREACH,
                };
                out.push(RawExpr::reject(NFT_REJECT_ICMP_UNREACH, code));
            }
            Stmt::Verdict(v) => {
                let (code, chain) = verdict_code(v);
                let mut attrs = vec![
                    (sys::NFTNL_EXPR_IMM_DREG, Attr::U32(NFT_REG_VERDICT)),
                    (sys::NFTNL_EXPR_IMM_VERDICT, Attr::U32(code as u32)),
                ];
                if let Some(c) = chain {
                    attrs.push((sys::NFTNL_EXPR_IMM_CHAIN, Attr::Str(cstr(c))));
                }
                out.push(RawExpr::new(c"immediate", attrs));
            }
        }
    }
}

fn payload(base: u32, offset: u32, len: u32, dreg: u32) -> RawExpr {
    RawExpr::payload(base, offset, len, dreg)
}

fn cmp(op: u32, sreg: u32, data: &[u8]) -> RawExpr {
    RawExpr::new(
        c"cmp",
        vec![
            (sys::NFTNL_EXPR_CMP_SREG, Attr::U32(sreg)),
            (sys::NFTNL_EXPR_CMP_OP, Attr::U32(op)),
            (sys::NFTNL_EXPR_CMP_DATA, Attr::Data(data.to_vec())),
        ],
    )
}

fn lookup(sreg: u32, dreg: Option<u32>, set: &CString, id: u32, invert: bool) -> RawExpr {
    let mut attrs = vec![
        (sys::NFTNL_EXPR_LOOKUP_SREG, Attr::U32(sreg)),
        (sys::NFTNL_EXPR_LOOKUP_SET, Attr::Str(set.clone())),
    ];
    if id != 0 {
        attrs.push((sys::NFTNL_EXPR_LOOKUP_SET_ID, Attr::U32(id)));
    }
    if let Some(d) = dreg {
        attrs.push((sys::NFTNL_EXPR_LOOKUP_DREG, Attr::U32(d)));
    }
    if invert {
        attrs.push((sys::NFTNL_EXPR_LOOKUP_FLAGS, Attr::U32(NFT_LOOKUP_F_INV)));
    }
    RawExpr::new(c"lookup", attrs)
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The first `len` bits of `bytes` bytes set.
fn prefix_mask(bytes: usize, len: u8) -> Vec<u8> {
    (0..bytes)
        .map(|i| {
            let bits = (len as usize).saturating_sub(i * 8).min(8);
            if bits == 0 {
                0
            } else {
                0xffu8 << (8 - bits)
            }
        })
        .collect()
}

/// The elements of an interval set holding `nets`: each range's first address, and the
/// address after its last one flagged as the interval's end (none past the top of the
/// address space).
fn interval_elements(nets: &[IpNet]) -> Vec<Elem> {
    let mut ranges: Vec<(u128, u128, bool)> = nets
        .iter()
        .map(|net| {
            let (v, v4) = match net.addr() {
                IpAddr::V4(a) => (u128::from(u32::from(a)), true),
                IpAddr::V6(a) => (u128::from(a), false),
            };
            let host = u32::from(net.max_prefix_len() - net.prefix_len());
            let size: u128 = if host >= 128 {
                u128::MAX
            } else {
                1u128 << host
            };
            let start = if host >= 128 { 0 } else { v & !(size - 1) };
            (start, start.saturating_add(size), v4)
        })
        .collect();
    ranges.sort();
    // Merge overlapping and adjacent ranges.
    let mut merged: Vec<(u128, u128, bool)> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => merged.push(r),
        }
    }
    let bytes = |v: u128, v4: bool| -> Vec<u8> {
        if v4 {
            (v as u32).to_be_bytes().to_vec()
        } else {
            v.to_be_bytes().to_vec()
        }
    };
    let mut out = Vec::new();
    for (start, end, v4) in merged {
        out.push(Elem {
            key: bytes(start, v4),
            flags: 0,
            verdict: None,
            comment: None,
        });
        let top = if v4 { 1u128 << 32 } else { u128::MAX };
        if end < top {
            out.push(Elem {
                key: bytes(end, v4),
                flags: NFT_SET_ELEM_INTERVAL_END,
                verdict: None,
                comment: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_intervals() {
        assert_eq!(prefix_mask(4, 8), vec![0xff, 0, 0, 0]);
        assert_eq!(prefix_mask(4, 25), vec![0xff, 0xff, 0xff, 0x80]);
        let e = interval_elements(&["172.30.0.0/16".parse().unwrap()]);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].key, vec![172, 30, 0, 0]);
        assert_eq!((e[1].key.clone(), e[1].flags), (vec![172, 31, 0, 0], 1));
        // Adjacent ranges merge; the top of the space has no end element.
        let e = interval_elements(&[
            "10.0.0.0/9".parse().unwrap(),
            "10.128.0.0/9".parse().unwrap(),
            "255.255.255.0/24".parse().unwrap(),
        ]);
        assert_eq!(
            e.len(),
            3,
            "{:?}",
            e.iter().map(|x| &x.key).collect::<Vec<_>>()
        );
    }

    #[test]
    fn key_layout_pads_every_field_to_four_bytes() {
        let k = ElementKey::AddrProtoPort(
            "172.30.0.41".parse().unwrap(),
            crate::model::Protocol::Tcp,
            80,
        );
        assert_eq!(key_bytes(&k), vec![172, 30, 0, 41, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(
            key_spec(Family::V4, Key::AddrProtoPort),
            ((((7 << 6) | 12) << 6) | 13, 12)
        );
    }
}
