//! Map layouts of other kpr versions, converted at start.
//!
//! A map's name carries its layout version. When an agent starts on a node where another
//! version pinned a map in a layout it knows how to read, it moves the entries into its own
//! map (in its own layout) before its programs replace the old ones, then removes the old pin:
//! live flows and affinity survive an upgrade and a downgrade. A pin of a layout it does not
//! know stops the start ([`super::foreign_layout_pins`]).
//!
//! The session-affinity maps changed layout between `_V1` and `_V2` (the `variant` build
//! pins `_V2`: the value's fields reordered); each build converts the other's. The conntrack
//! map's `_V1` (one LRU map without states) is converted by [`super::conntrack::adopt_v1`].

use std::path::Path;

use aya::maps::{HashMap, MapData};
use kpr_common::{Affinity4Value, AFFINITY_EXT6_MAP, AFFINITY_EXT_MAP, AFFINITY_MAP};

use super::maps::open_pinned;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("converting {from} to {to}: {detail}")]
    Convert {
        from: String,
        to: &'static str,
        detail: String,
    },
}

/// An affinity value as some layout stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Affinity {
    last_used_ns: u64,
    backend_id: u32,
    slot: u16,
}

/// `_V1`: `last_used_ns` first.
fn affinity_v1(b: &[u8; 16]) -> Affinity {
    Affinity {
        last_used_ns: u64::from_ne_bytes(b[0..8].try_into().unwrap()),
        backend_id: u32::from_ne_bytes(b[8..12].try_into().unwrap()),
        slot: u16::from_ne_bytes(b[12..14].try_into().unwrap()),
    }
}

/// `_V2`: `backend_id` and `slot` first.
fn affinity_v2(b: &[u8; 16]) -> Affinity {
    Affinity {
        backend_id: u32::from_ne_bytes(b[0..4].try_into().unwrap()),
        slot: u16::from_ne_bytes(b[4..6].try_into().unwrap()),
        last_used_ns: u64::from_ne_bytes(b[8..16].try_into().unwrap()),
    }
}

/// Reads one layout's affinity value.
type Decoder = fn(&[u8; 16]) -> Affinity;

/// (the other layout's pin, its decoder) for each affinity map of this build.
fn affinity_sources(ours: &str) -> Option<(String, Decoder)> {
    let (base, version) = ours.rsplit_once("_V")?;
    match version {
        "1" => Some((format!("{base}_V2"), affinity_v2)),
        "2" => Some((format!("{base}_V1"), affinity_v1)),
        _ => None,
    }
}

/// The pins of other layouts this build converts (besides conntrack's `_V1`).
pub fn convertible_pins() -> Vec<String> {
    [AFFINITY_MAP, AFFINITY_EXT_MAP, AFFINITY_EXT6_MAP]
        .iter()
        .filter_map(|m| affinity_sources(m).map(|(p, _)| p))
        .collect()
}

/// Converts whatever other-layout affinity maps are pinned in `pin_dir` into this build's
/// (already created there by the loader) and removes their pins. Returns (old pin, entries).
pub fn convert(pin_dir: &Path) -> Result<Vec<(String, usize)>, LayoutError> {
    let mut done = Vec::new();
    for (ours, key_len) in [
        (AFFINITY_MAP, 16usize),
        (AFFINITY_EXT_MAP, 8),
        (AFFINITY_EXT6_MAP, 20),
    ] {
        let Some((theirs, decode)) = affinity_sources(ours) else {
            continue;
        };
        let old_pin = pin_dir.join(&theirs);
        if !old_pin.exists() {
            continue;
        }
        let n = match key_len {
            16 => move_entries::<16>(&old_pin, &pin_dir.join(ours), decode),
            20 => move_entries::<20>(&old_pin, &pin_dir.join(ours), decode),
            _ => move_entries::<8>(&old_pin, &pin_dir.join(ours), decode),
        }
        .map_err(|detail| LayoutError::Convert {
            from: theirs.clone(),
            to: ours,
            detail,
        })?;
        std::fs::remove_file(&old_pin).map_err(|e| LayoutError::Convert {
            from: theirs.clone(),
            to: ours,
            detail: e.to_string(),
        })?;
        done.push((theirs, n));
    }
    Ok(done)
}

fn move_entries<const K: usize>(
    old_pin: &Path,
    new_pin: &Path,
    decode: Decoder,
) -> Result<usize, String> {
    let old: HashMap<MapData, [u8; K], [u8; 16]> = open_pinned(old_pin)?;
    let mut new: HashMap<MapData, [u8; K], Affinity4Value> = open_pinned(new_pin)?;
    let entries: Vec<([u8; K], [u8; 16])> = old.iter().filter_map(Result::ok).collect();
    let mut moved = 0;
    for (k, v) in entries {
        let a = decode(&v);
        let value = Affinity4Value {
            last_used_ns: a.last_used_ns,
            backend_id: a.backend_id,
            slot: a.slot,
            pad: 0,
        };
        new.insert(k, value, 0).map_err(|e| e.to_string())?;
        moved += 1;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_affinity_layouts_decode_to_the_same_entry() {
        let a = Affinity {
            last_used_ns: 0x0102_0304_0506_0708,
            backend_id: 42,
            slot: 7,
        };
        let mut v1 = [0u8; 16];
        v1[0..8].copy_from_slice(&a.last_used_ns.to_ne_bytes());
        v1[8..12].copy_from_slice(&a.backend_id.to_ne_bytes());
        v1[12..14].copy_from_slice(&a.slot.to_ne_bytes());
        let mut v2 = [0u8; 16];
        v2[0..4].copy_from_slice(&a.backend_id.to_ne_bytes());
        v2[4..6].copy_from_slice(&a.slot.to_ne_bytes());
        v2[8..16].copy_from_slice(&a.last_used_ns.to_ne_bytes());
        assert_eq!(affinity_v1(&v1), a);
        assert_eq!(affinity_v2(&v2), a);
        // This build's own layout is one of them.
        let ours = Affinity4Value {
            last_used_ns: a.last_used_ns,
            backend_id: a.backend_id,
            slot: a.slot,
            pad: 0,
        };
        // SAFETY: a repr(C) plain-data struct of 16 bytes.
        let bytes: [u8; 16] = unsafe { std::mem::transmute(ours) };
        let decoded = if AFFINITY_MAP.ends_with("_V1") {
            affinity_v1(&bytes)
        } else {
            affinity_v2(&bytes)
        };
        assert_eq!(decoded, a);
    }

    #[test]
    fn each_build_converts_the_other_layout() {
        let pins = convertible_pins();
        if AFFINITY_MAP.ends_with("_V1") {
            assert_eq!(pins, ["KPR_AFF4_V2", "KPR_AFFX4_V2", "KPR_AFFX6_V2"]);
        } else {
            assert_eq!(pins, ["KPR_AFF4_V1", "KPR_AFFX4_V1", "KPR_AFFX6_V1"]);
        }
    }
}
