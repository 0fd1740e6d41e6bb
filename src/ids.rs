//! Owners as the mount shows them and as the layers store them: the
//! fuse-overlayfs `uidmapping=`/`gidmapping=` options (a file owned by
//! CONTAINER id on disk is shown as owned by HOST id; creations and chown
//! go the other way), and `squash_to_root`/`squash_to_uid`/`squash_to_gid`
//! (every object shown as owned by one id), applied to owners and to the
//! named user and group entries of POSIX ACLs. Without options, ids pass
//! through unchanged.

/// One `CONTAINER:HOST:LEN` range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub disk: u32,
    pub shown: u32,
    pub len: u32,
}

/// The id an unmapped id becomes, as the kernel shows unmapped ids.
pub const OVERFLOW_ID: u32 = 65534;

/// A translation of one kind of id (users or groups).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    /// Empty: ids pass through unchanged.
    pub ranges: Vec<IdRange>,
    /// Every object is shown as owned by this id.
    pub squash: Option<u32>,
}

impl IdMap {
    /// Parses `C:H:L[:C:H:L...]`; containers/storage writes each range
    /// with a leading colon (`:C:H:L:C:H:L`), which is taken as well.
    pub fn parse_ranges(s: &str) -> Result<Vec<IdRange>, String> {
        let nums: Vec<u32> = s
            .strip_prefix(':')
            .unwrap_or(s)
            .split(':')
            .map(|n| n.parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("bad id mapping '{s}': expected CONTAINER:HOST:LEN[:...]"))?;
        if nums.is_empty() || !nums.len().is_multiple_of(3) {
            return Err(format!(
                "bad id mapping '{s}': expected CONTAINER:HOST:LEN[:...]"
            ));
        }
        let ranges: Vec<IdRange> = nums
            .chunks(3)
            .map(|c| IdRange {
                disk: c[0],
                shown: c[1],
                len: c[2],
            })
            .collect();
        if let Some(r) = ranges.iter().find(|r| {
            r.len == 0
                || r.disk.checked_add(r.len - 1).is_none()
                || r.shown.checked_add(r.len - 1).is_none()
        }) {
            return Err(format!(
                "bad id mapping '{s}': range {}:{}:{} is empty or overflows",
                r.disk, r.shown, r.len
            ));
        }
        Ok(ranges)
    }

    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty() && self.squash.is_none()
    }

    /// The id shown for an id stored on disk.
    pub fn shown(&self, disk: u32) -> u32 {
        match self.squash {
            Some(id) => id,
            None => self.ranged(disk),
        }
    }

    /// The id shown for an id on disk by the ranges alone (squashing is
    /// about owners, not about the users an ACL names).
    fn ranged(&self, disk: u32) -> u32 {
        if self.ranges.is_empty() {
            return disk;
        }
        self.ranges
            .iter()
            .find(|r| disk >= r.disk && disk - r.disk < r.len)
            .map_or(OVERFLOW_ID, |r| r.shown + (disk - r.disk))
    }

    /// The id stored on disk for an id given through the mount.
    pub fn disk(&self, shown: u32) -> u32 {
        if self.ranges.is_empty() {
            return shown;
        }
        self.ranges
            .iter()
            .find(|r| shown >= r.shown && shown - r.shown < r.len)
            .map_or(OVERFLOW_ID, |r| r.disk + (shown - r.shown))
    }
}

/// Both translations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMapping {
    pub uids: IdMap,
    pub gids: IdMap,
}

/// Names of the extended attributes that hold POSIX ACLs.
pub fn is_posix_acl(name: &[u8]) -> bool {
    name == b"system.posix_acl_access" || name == b"system.posix_acl_default"
}

/// Tags of the ACL entries that name a user or a group (`ACL_USER`,
/// `ACL_GROUP` in the xattr format: a 4-byte version, then 8-byte entries of
/// tag u16, permissions u16, id u32, little-endian).
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

impl IdMapping {
    /// An ACL as stored on disk, with the ids it names as shown.
    pub fn acl_shown(&self, acl: &[u8]) -> Vec<u8> {
        self.map_acl(acl, |map, id| map.ranged(id))
    }

    /// An ACL given through the mount, with the ids it names as stored.
    pub fn acl_disk(&self, acl: &[u8]) -> Vec<u8> {
        self.map_acl(acl, IdMap::disk)
    }

    fn map_acl(&self, acl: &[u8], map_id: impl Fn(&IdMap, u32) -> u32) -> Vec<u8> {
        let mut out = acl.to_vec();
        if acl.len() < 4 || !(acl.len() - 4).is_multiple_of(8) {
            return out; // not an ACL: the filesystem below will say so
        }
        for entry in out[4..].chunks_exact_mut(8) {
            let map = match u16::from_le_bytes([entry[0], entry[1]]) {
                ACL_USER => &self.uids,
                ACL_GROUP => &self.gids,
                _ => continue,
            };
            let id = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
            entry[4..8].copy_from_slice(&map_id(map, id).to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways_and_overflows_outside() {
        let m = IdMap {
            ranges: IdMap::parse_ranges("0:1000:1:1:110000:65536").unwrap(),
            squash: None,
        };
        assert_eq!(m.shown(0), 1000);
        assert_eq!(m.shown(1), 110000);
        assert_eq!(m.shown(65536), 175535);
        assert_eq!(m.shown(65537), OVERFLOW_ID);
        assert_eq!(m.disk(1000), 0);
        assert_eq!(m.disk(110005), 6);
        assert_eq!(m.disk(5), OVERFLOW_ID);
    }

    #[test]
    fn acl_entries_naming_users_and_groups_are_mapped() {
        let ids = IdMapping {
            uids: IdMap {
                ranges: IdMap::parse_ranges("0:100000:65536").unwrap(),
                squash: Some(0),
            },
            gids: IdMap {
                ranges: IdMap::parse_ranges("0:200000:65536").unwrap(),
                squash: None,
            },
        };
        let entry = |tag: u16, id: u32| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend_from_slice(&4u16.to_le_bytes());
            e.extend_from_slice(&id.to_le_bytes());
            e
        };
        let acl = |entries: &[(u16, u32)]| {
            let mut v = 2u32.to_le_bytes().to_vec();
            for (tag, id) in entries {
                v.extend(entry(*tag, *id));
            }
            v
        };
        // Owner, named user, owning group, named group, mask.
        let naming = |user: u32, group: u32| {
            acl(&[
                (1, u32::MAX),
                (2, user),
                (4, u32::MAX),
                (8, group),
                (0x10, u32::MAX),
            ])
        };
        let (on_disk, shown) = (naming(5, 6), naming(100005, 200006));
        assert_eq!(ids.acl_shown(&on_disk), shown);
        assert_eq!(ids.acl_disk(&shown), on_disk);
        assert_eq!(ids.acl_disk(&acl(&[(2, 7)])), acl(&[(2, OVERFLOW_ID)]));
        assert_eq!(ids.acl_shown(b"bad"), b"bad");
    }

    #[test]
    fn squash_wins_for_what_is_shown() {
        let m = IdMap {
            ranges: vec![],
            squash: Some(0),
        };
        assert_eq!(m.shown(1234), 0);
        assert_eq!(m.disk(1234), 1234);
    }

    #[test]
    fn refuses_bad_mappings() {
        assert_eq!(
            IdMap::parse_ranges(":0:100000:65536:65536:0:1")
                .unwrap()
                .len(),
            2
        );
        for bad in [
            "",
            ":",
            "1:2",
            "a:b:c",
            "0:0:0",
            "1:2:3:4",
            "4294967295:0:2",
            "::0:1:2",
        ] {
            assert!(IdMap::parse_ranges(bad).is_err(), "{bad}");
        }
    }
}
