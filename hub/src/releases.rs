//! Edge software releases at the hub (auto-update): what a release is, its rollout ring, the
//! key that signs it, and its artifact on disk.
//!
//! Artifacts live in `<data dir>/releases/<target>/<version>.artifact`, never in SQLite (a
//! hub from before targets had their own directories keeps `<version>.artifact`, still
//! served). Publishing streams the upload to `<version>.artifact.tmp` while hashing it
//! (blake3) and counting its
//! size, fsyncs it, renames it into place and fsyncs the directory; only then does the caller
//! sign it and record the release in the [`HubStore`](crate::store::HubStore), so a release
//! the store knows always has its whole artifact on disk. A crash before the record leaves at
//! most an artifact no one is offered, which the next publish of that version replaces.
//!
//! The ring decides who is offered a release: `canary` releases go to the branches in the
//! canary ring only, `all` releases to every branch (promoting a release moves it from
//! `canary` to `all`).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use shared::Timestamp;
use shared::release::{ARTIFACT_BYTES_MAX, ReleaseOffer, parse_version};
use shared::wire::TEXT_BYTES_MAX;
use tokio::io::{AsyncWriteExt, BufWriter};

use crate::identity::HubIdentity;

/// The directory under the hub's data dir that holds the artifacts.
pub const RELEASES_DIR: &str = "releases";
/// Longest target name (`<arch>-<os>`).
pub const TARGET_BYTES_MAX: usize = 64;
/// Bytes read from an artifact per write when serving a download.
pub const SERVE_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes an upload gathers before it writes to its file.
const UPLOAD_BUFFER_BYTES: usize = 1 << 20;

const ARTIFACT_SUFFIX: &str = ".artifact";
const TEMP_SUFFIX: &str = ".artifact.tmp";

/// A rollout ring: which branches are offered a release, or which releases a branch gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Early adopters: a canary branch gets canary releases as well as general ones.
    Canary,
    /// Everyone.
    All,
}

impl Ring {
    pub fn as_str(self) -> &'static str {
        match self {
            Ring::Canary => "canary",
            Ring::All => "all",
        }
    }

    pub fn parse(s: &str) -> Option<Ring> {
        match s {
            "canary" => Some(Ring::Canary),
            "all" => Some(Ring::All),
            _ => None,
        }
    }

    /// Whether a branch in ring `self` is offered a release in ring `release`.
    pub fn gets(self, release: Ring) -> bool {
        release == Ring::All || self == Ring::Canary
    }
}

/// A published release, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// A semantic version, unique among releases.
    pub version: String,
    /// The platform the artifact runs on (`<arch>-<os>`).
    pub target: String,
    /// The artifact's length in bytes.
    pub size: u64,
    /// blake3 of the artifact.
    pub hash: [u8; 32],
    /// ed25519 over [`shared::release::signed_message`], by the hub's release key.
    pub signature: [u8; 64],
    pub ring: Ring,
    pub published_at: Timestamp,
}

impl Release {
    /// The release as the hub offers it to an edge.
    pub fn offer(&self) -> ReleaseOffer {
        ReleaseOffer {
            version: self.version.clone(),
            target: self.target.clone(),
            size: self.size,
            hash: self.hash,
            signature: self.signature.to_vec(),
        }
    }
}

/// Checks a version given for a new release: a strict semantic version that fits in a sync
/// frame's text (and so is also a safe file name: digits, letters, `.`, `-`, `+`).
pub fn check_version(version: &str) -> Result<(), String> {
    if version.len() > TEXT_BYTES_MAX {
        return Err(format!(
            "a release version is at most {TEXT_BYTES_MAX} bytes"
        ));
    }
    parse_version(version).map(drop)
}

/// Checks a target name: 1 to [`TARGET_BYTES_MAX`] lowercase ASCII letters, digits, `_`,
/// `-` or `.`, starting with a letter or digit. It names a directory, so `.`, `..` and names
/// that differ only in case are impossible.
pub fn check_target(target: &str) -> Result<(), String> {
    let ok = target.len() <= TARGET_BYTES_MAX
        && target
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && target.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a target is 1 to {TARGET_BYTES_MAX} lowercase letters, digits, '_', '-' or '.', starting with a letter or digit (like x86_64-linux)"
        ))
    }
}

/// Signs release messages (the hub's ed25519 release key).
pub trait ReleaseSigner: Send + Sync + 'static {
    /// The 64-byte ed25519 signature of `msg`.
    fn sign(&self, msg: &[u8]) -> [u8; 64];
}

impl ReleaseSigner for HubIdentity {
    fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.sign_release(msg).to_bytes()
    }
}

/// Why an upload was not kept.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the artifact is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the artifact is empty")]
    Empty,
    #[error("storing the artifact failed: {0}")]
    Io(#[from] io::Error),
}

/// The releases' artifacts on disk, and the key that signs releases.
pub struct ReleaseFiles {
    dir: PathBuf,
    signer: Arc<dyn ReleaseSigner>,
    /// Versions being uploaded right now (one upload per version at a time).
    uploading: Mutex<HashSet<String>>,
    /// Largest artifact accepted.
    max_bytes: u64,
}

impl std::fmt::Debug for ReleaseFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseFiles")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ReleaseFiles {
    /// Opens (creating it if needed) `<data_dir>/releases`, and removes the temporary files
    /// of uploads a crash interrupted.
    pub fn open(data_dir: &Path, signer: Arc<dyn ReleaseSigner>) -> io::Result<ReleaseFiles> {
        let dir = data_dir.join(RELEASES_DIR);
        std::fs::create_dir_all(&dir)?;
        let remove_temps = |dir: &Path| -> io::Result<()> {
            for entry in std::fs::read_dir(dir)?.flatten() {
                if entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(TEMP_SUFFIX))
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            Ok(())
        };
        remove_temps(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_temps(&entry.path())?;
            }
        }
        Ok(ReleaseFiles {
            dir,
            signer,
            uploading: Mutex::new(HashSet::new()),
            max_bytes: ARTIFACT_BYTES_MAX,
        })
    }

    /// The directory of the artifacts.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where release `version`'s artifact for `target` is (both must have passed
    /// [`check_version`] and [`check_target`]).
    pub fn artifact_path(&self, version: &str, target: &str) -> PathBuf {
        self.dir
            .join(target)
            .join(format!("{version}{ARTIFACT_SUFFIX}"))
    }

    /// Moves the artifacts of a hub from before per-target directories
    /// (`releases/<version>.artifact`) to their release's target directory, durably. Called
    /// at start with the store's releases.
    pub fn adopt_legacy(&self, releases: &[Release]) -> io::Result<()> {
        for r in releases {
            let legacy = self.dir.join(format!("{}{ARTIFACT_SUFFIX}", r.version));
            let path = self.artifact_path(&r.version, &r.target);
            if !legacy.exists() || path.exists() {
                continue;
            }
            let dir = self.dir.join(&r.target);
            std::fs::create_dir_all(&dir)?;
            std::fs::rename(&legacy, &path)?;
            std::fs::File::open(&dir)?.sync_all()?;
            std::fs::File::open(&self.dir)?.sync_all()?;
            tracing::info!(version = %r.version, target = %r.target, "release artifact moved to its platform's directory");
        }
        Ok(())
    }

    /// The ed25519 signature of a release's fields ([`shared::release::signed_message`]).
    pub fn sign(&self, version: &str, target: &str, size: u64, hash: &[u8; 32]) -> [u8; 64] {
        self.signer.sign(&shared::release::signed_message(
            version, target, size, hash,
        ))
    }

    /// Starts the upload of `version`'s artifact for `target` (both checked), or `None` when
    /// another upload of that release is under way. Dropping the upload before
    /// [`Upload::commit`] leaves nothing behind; until it is dropped, no other upload of the
    /// release can start, so hold it until the release is recorded.
    pub async fn begin(&self, version: &str, target: &str) -> io::Result<Option<Upload<'_>>> {
        let key = format!("{target}/{version}");
        if !self.uploading.lock().insert(key.clone()) {
            return Ok(None);
        }
        let target_dir = self.dir.join(target);
        let mut upload = Upload {
            files: self,
            key,
            path: target_dir.join(format!("{version}{ARTIFACT_SUFFIX}")),
            tmp: target_dir.join(format!("{version}{TEMP_SUFFIX}")),
            file: None,
            hasher: blake3::Hasher::new(),
            size: 0,
        };
        // Created before the file: a failure here drops the upload, which clears its key.
        tokio::fs::create_dir_all(&target_dir).await?;
        upload.file = Some(BufWriter::with_capacity(
            UPLOAD_BUFFER_BYTES,
            tokio::fs::File::create(&upload.tmp).await?,
        ));
        Ok(Some(upload))
    }

    #[cfg(test)]
    fn with_max_bytes(mut self, max: u64) -> ReleaseFiles {
        self.max_bytes = max;
        self
    }
}

/// An artifact being uploaded to its temporary file. Dropped without a commit, it removes the
/// temporary file.
pub struct Upload<'a> {
    files: &'a ReleaseFiles,
    /// `<target>/<version>`, in [`ReleaseFiles::uploading`] while this lives.
    key: String,
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<tokio::fs::File>>,
    hasher: blake3::Hasher,
    size: u64,
}

impl Upload<'_> {
    /// Appends the next bytes of the artifact.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), UploadError> {
        let size = self.size.saturating_add(bytes.len() as u64);
        if size > self.files.max_bytes {
            return Err(UploadError::TooLarge(self.files.max_bytes));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the upload's file is closed"))?;
        file.write_all(bytes).await?;
        self.hasher.update(bytes);
        self.size = size;
        Ok(())
    }

    /// Bytes received so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the artifact durable in its place: fsync, rename, fsync of the directory.
    /// Returns its size and blake3 hash. Keep the upload until the release is recorded: it
    /// holds off other uploads of the version.
    pub async fn commit(&mut self) -> Result<(u64, [u8; 32]), UploadError> {
        if self.size == 0 {
            return Err(UploadError::Empty);
        }
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("the upload's file is closed"))?;
        file.flush().await?;
        let mut file = file.into_inner();
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&self.tmp, &self.path).await?;
        // The target's directory (the new name in it) and the releases directory (the target
        // directory's own entry, when this made it).
        let dirs = [
            self.path
                .parent()
                .map_or_else(|| self.files.dir.clone(), Path::to_path_buf),
            self.files.dir.clone(),
        ];
        tokio::task::spawn_blocking(move || {
            dirs.iter()
                .try_for_each(|d| std::fs::File::open(d)?.sync_all())
        })
        .await
        .map_err(io::Error::other)??;
        Ok((self.size, *self.hasher.finalize().as_bytes()))
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        // After a commit the temporary file was renamed away and this finds nothing.
        drop(self.file.take());
        let _ = std::fs::remove_file(&self.tmp);
        self.files.uploading.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FixedSigner;

    impl ReleaseSigner for FixedSigner {
        fn sign(&self, msg: &[u8]) -> [u8; 64] {
            let h = blake3::hash(msg);
            let mut out = [0u8; 64];
            out[..32].copy_from_slice(h.as_bytes());
            out
        }
    }

    fn files(dir: &Path) -> ReleaseFiles {
        ReleaseFiles::open(dir, Arc::new(FixedSigner)).unwrap()
    }

    #[test]
    fn versions_and_targets_are_checked() {
        assert!(check_version("1.2.3").is_ok());
        assert!(check_version("1.2.3-rc.1+build.5").is_ok());
        for bad in ["", "1.2", "v1.2.3", "../1.2.3", "1.2.3/x", "01.2.3"] {
            assert!(check_version(bad).is_err(), "{bad:?}");
        }
        assert!(check_version(&format!("1.2.3-{}", "a".repeat(300))).is_err());
        assert!(check_target("x86_64-linux").is_ok());
        assert!(check_target("aarch64-linux").is_ok());
        for bad in [
            "",
            "x/y",
            "a b",
            &"a".repeat(65),
            ".",
            "..",
            ".x",
            "-x",
            "X86_64-linux",
        ] {
            assert!(check_target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rings_decide_who_gets_what() {
        assert!(Ring::Canary.gets(Ring::Canary));
        assert!(Ring::Canary.gets(Ring::All));
        assert!(Ring::All.gets(Ring::All));
        assert!(!Ring::All.gets(Ring::Canary));
        assert_eq!(Ring::parse("canary"), Some(Ring::Canary));
        assert_eq!(Ring::parse("all"), Some(Ring::All));
        assert_eq!(Ring::parse("Canary"), None);
    }

    const X86: &str = "x86_64-linux";
    const ARM: &str = "aarch64-linux";

    #[tokio::test]
    async fn an_upload_lands_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let mut up = files.begin("1.0.0", X86).await.unwrap().unwrap();
        // One upload per release at a time, until the first is dropped; the same version for
        // another target is another release.
        assert!(files.begin("1.0.0", X86).await.unwrap().is_none());
        let mut arm = files.begin("1.0.0", ARM).await.unwrap().unwrap();
        up.write(b"hello ").await.unwrap();
        up.write(b"world").await.unwrap();
        arm.write(b"arm bytes").await.unwrap();
        let (size, hash) = up.commit().await.unwrap();
        arm.commit().await.unwrap();
        assert!(files.begin("1.0.0", X86).await.unwrap().is_none());
        drop(up);
        drop(arm);
        assert_eq!(size, 11);
        assert_eq!(hash, *blake3::hash(b"hello world").as_bytes());
        assert_eq!(
            std::fs::read(files.artifact_path("1.0.0", X86)).unwrap(),
            b"hello world"
        );
        assert_eq!(
            std::fs::read(files.artifact_path("1.0.0", ARM)).unwrap(),
            b"arm bytes"
        );
        assert!(
            !dir.path()
                .join("releases/x86_64-linux/1.0.0.artifact.tmp")
                .exists()
        );

        // Abandoned, empty or too large: nothing is left behind.
        let mut up = files.begin("1.0.1", X86).await.unwrap().unwrap();
        up.write(b"part").await.unwrap();
        drop(up);
        let mut up = files.begin("1.0.1", X86).await.unwrap().unwrap();
        assert!(matches!(up.commit().await, Err(UploadError::Empty)));
        drop(up);
        let small = files_limited(dir.path(), 4);
        let mut up = small.begin("1.0.2", X86).await.unwrap().unwrap();
        up.write(b"abcd").await.unwrap();
        assert!(matches!(
            up.write(b"e").await,
            Err(UploadError::TooLarge(4))
        ));
        drop(up);
        let names: Vec<String> = std::fs::read_dir(files.dir().join(X86))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["1.0.0.artifact".to_owned()]);
    }

    fn files_limited(dir: &Path, max: u64) -> ReleaseFiles {
        files(dir).with_max_bytes(max)
    }

    #[test]
    fn stale_temporary_files_are_removed_on_open_and_old_artifacts_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let releases = dir.path().join(RELEASES_DIR);
        std::fs::create_dir_all(releases.join(X86)).unwrap();
        std::fs::write(releases.join("2.0.0.artifact.tmp"), b"torn").unwrap();
        std::fs::write(releases.join(X86).join("3.0.0.artifact.tmp"), b"torn").unwrap();
        // Where a hub from before per-target directories kept its artifacts.
        std::fs::write(releases.join("1.0.0.artifact"), b"kept").unwrap();
        let files = files(dir.path());
        assert!(!releases.join("2.0.0.artifact.tmp").exists());
        assert!(!releases.join(X86).join("3.0.0.artifact.tmp").exists());
        let old = Release {
            version: "1.0.0".into(),
            target: ARM.into(),
            size: 4,
            hash: [0; 32],
            signature: [0; 64],
            ring: Ring::All,
            published_at: Timestamp(0),
        };
        files.adopt_legacy(std::slice::from_ref(&old)).unwrap();
        assert_eq!(
            std::fs::read(files.artifact_path("1.0.0", ARM)).unwrap(),
            b"kept"
        );
        assert!(!releases.join("1.0.0.artifact").exists());
        assert!(
            !files.artifact_path("1.0.0", X86).exists(),
            "only its own platform"
        );
        // Again: nothing to do.
        files.adopt_legacy(&[old]).unwrap();
        assert_eq!(
            files.artifact_path("4.0.0", X86),
            releases.join(X86).join("4.0.0.artifact")
        );
        let sig = files.sign("1.0.0", X86, 4, &[0; 32]);
        assert_ne!(sig, [0; 64]);
    }
}
