//! Owners as the mount shows them and as the layers store them: the
//! fuse-overlayfs `uidmapping=`/`gidmapping=` options (a file owned by
//! CONTAINER id on disk is shown as owned by HOST id; creations and chown
//! go the other way), and `squash_to_root`/`squash_to_uid`/`squash_to_gid`
//! (every object shown as owned by one id). Without options, ids pass
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
        if let Some(id) = self.squash {
            return id;
        }
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
