//! Edge software releases (auto-update): what the hub offers an edge, the exact bytes the
//! release key signs, version ordering, and what an edge reports back about an update.
//!
//! Signing and verifying are the hub's and the edge's business (ed25519 there); this module
//! only fixes the message, so both sides sign and verify the very same bytes.

use serde::{Deserialize, Serialize};

/// A release's artifact is at most this large (the hub refuses bigger uploads).
pub const ARTIFACT_BYTES_MAX: u64 = 1 << 30;
/// Offers in one `Releases` frame, at most.
pub const OFFERS_MAX: usize = 8;
/// Update reports in one `UpdateReports` frame, at most.
pub const REPORTS_MAX: usize = 16;

/// The platform this build runs on, as releases name it: `<arch>-<os>`, e.g. `x86_64-linux`.
pub fn this_target() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// A semantic version, parsed strictly (`1.2.3`, `1.2.3-rc.1`).
pub fn parse_version(s: &str) -> Result<semver::Version, String> {
    semver::Version::parse(s).map_err(|e| format!("{s:?} is not a semantic version: {e}"))
}

/// Whether `candidate` is a newer version than `running` (unparsable versions are never
/// newer, and a running version that does not parse is older than any release).
pub fn is_newer(candidate: &str, running: &str) -> bool {
    match (parse_version(candidate), parse_version(running)) {
        (Ok(c), Ok(r)) => c > r,
        (Ok(_), Err(_)) => true,
        _ => false,
    }
}

/// A release as the hub offers it to an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseOffer {
    pub version: String,
    pub target: String,
    pub size: u64,
    /// blake3 of the artifact.
    pub hash: [u8; 32],
    /// ed25519 over [`signed_message`], by the hub's release key (64 bytes).
    pub signature: Vec<u8>,
}

impl ReleaseOffer {
    pub fn signed_message(&self) -> Vec<u8> {
        signed_message(&self.version, &self.target, self.size, &self.hash)
    }
}

/// The bytes the release key signs: version, target, size and hash, one per line, each text
/// with its length so that no field can pass for another.
pub fn signed_message(version: &str, target: &str, size: u64, hash: &[u8; 32]) -> Vec<u8> {
    format!(
        "outpost-release/1\nversion {} {version}\ntarget {} {target}\nsize {size}\nblake3 {}\n",
        version.len(),
        target.len(),
        hex::encode(hash)
    )
    .into_bytes()
}

/// How an update attempt ended, as the edge reports it to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateOutcome {
    /// The new version came up healthy and runs.
    Installed,
    /// It was not installed: the download failed verification (size, hash, signature,
    /// target) or the binary failed its self-check.
    Refused,
    /// It was installed, did not become healthy, and the previous version runs again.
    RolledBack,
}

impl UpdateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateOutcome::Installed => "installed",
            UpdateOutcome::Refused => "refused",
            UpdateOutcome::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<UpdateOutcome> {
        match s {
            "installed" => Some(UpdateOutcome::Installed),
            "refused" => Some(UpdateOutcome::Refused),
            "rolled_back" => Some(UpdateOutcome::RolledBack),
            _ => None,
        }
    }
}

/// One update attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// The release tried.
    pub version: String,
    /// The version that ran before.
    pub from: String,
    pub outcome: UpdateOutcome,
    /// Why, in a sentence (at most 256 bytes on the wire).
    pub detail: String,
    /// When it ended, microseconds since the Unix epoch.
    pub at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_as_semver() {
        assert!(is_newer("0.2.0", "0.1.9"));
        assert!(is_newer("0.10.0", "0.9.0"));
        assert!(is_newer("1.0.0", "1.0.0-rc.1"));
        assert!(!is_newer("0.1.0", "0.1.0"));
        assert!(!is_newer("0.1.0", "0.2.0"));
        assert!(!is_newer("banana", "0.1.0"));
        assert!(is_newer("0.1.0", "unknown"));
        assert!(parse_version("1.2").is_err());
    }

    #[test]
    fn the_signed_message_binds_every_field() {
        let h = [7u8; 32];
        let base = signed_message("1.0.0", "x86_64-linux", 10, &h);
        assert_ne!(base, signed_message("1.0.1", "x86_64-linux", 10, &h));
        assert_ne!(base, signed_message("1.0.0", "aarch64-linux", 10, &h));
        assert_ne!(base, signed_message("1.0.0", "x86_64-linux", 11, &h));
        assert_ne!(
            base,
            signed_message("1.0.0", "x86_64-linux", 10, &[8u8; 32])
        );
        // A version cannot smuggle a line of its own into the message.
        assert_ne!(
            signed_message("1.0.0\ntarget x", "y", 1, &h),
            signed_message("1.0.0", "x\ntarget y", 1, &h)
        );
    }
}
