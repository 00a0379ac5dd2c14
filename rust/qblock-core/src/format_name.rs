//! Format identities and their names: one table, both directions.

/// Every image format libqblock knows by name (the seed's list plus QEMU's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    Cow,
    Qed,
    Qcow,
    Qcow2,
    Raw,
    Rbd,
    Sheepdog,
    Vdi,
    Vmdk,
    Vpc,
    Vhdx,
    Luks,
    Parallels,
    Dmg,
    Bochs,
    Cloop,
}

/// The single name table. QEMU's names are the canonical spelling.
pub const FORMAT_NAMES: &[(Format, &str)] = &[
    (Format::Cow, "cow"),
    (Format::Qed, "qed"),
    (Format::Qcow, "qcow"),
    (Format::Qcow2, "qcow2"),
    (Format::Raw, "raw"),
    (Format::Rbd, "rbd"),
    (Format::Sheepdog, "sheepdog"),
    (Format::Vdi, "vdi"),
    (Format::Vmdk, "vmdk"),
    (Format::Vpc, "vpc"),
    (Format::Vhdx, "vhdx"),
    (Format::Luks, "luks"),
    (Format::Parallels, "parallels"),
    (Format::Dmg, "dmg"),
    (Format::Bochs, "bochs"),
    (Format::Cloop, "cloop"),
];

impl Format {
    pub fn name(self) -> &'static str {
        FORMAT_NAMES
            .iter()
            .find(|(f, _)| *f == self)
            .map(|(_, n)| *n)
            .unwrap_or("unknown")
    }

    pub fn from_name(name: &str) -> Option<Format> {
        FORMAT_NAMES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(f, _)| *f)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (f, n) in FORMAT_NAMES {
            assert_eq!(Format::from_name(n), Some(*f));
            assert_eq!(f.name(), *n);
        }
        assert_eq!(FORMAT_NAMES.len(), 16);
        assert_eq!(Format::from_name("nope"), None);
    }
}
