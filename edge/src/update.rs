//! Auto-update: versioned releases in the data dir, the keeper that runs the current one and
//! rolls back a release that does not come up, and the worker's side (download, verify,
//! self-check, stage, switch).
//!
//! Layout under `<data dir>/releases/`:
//!
//! | path | what |
//! |---|---|
//! | `<version>/outpost-edge` | a release's binary (0755) |
//! | `current` | the version to run and, while it is on trial, its [`Trial`] (the release to return to, starts so far); replaced atomically |
//! | `<version>.part` | a download in progress (resumed from its length) |
//! | `state.json` | refused versions, soft-rollback counts, the previous release, the latest outcomes |
//!
//! Processes: `outpost-edge serve --hub ...` is the **keeper**. It installs the running binary
//! as the first release, then runs `releases/<current>/outpost-edge serve ...` as its
//! **worker**, with the release's version in `OUTPOST_EDGE_WORKER` and a pipe on its stdin:
//! a line `stop` asks the worker to shut down cleanly; the pipe's end (the keeper died, e.g.
//! kill -9) makes it exit at once, as the pair would have. A worker that has staged a new
//! release switches `current` and exits with [`EXIT_UPDATE`]; the keeper starts the new one in
//! probation. The worker in probation commits the release once its store is open, its API
//! listens and the hub has welcomed it. A release that exits before that [`CRASHES_MAX`]
//! times, or is not healthy within the deadline, is rolled back: `current` returns to the
//! previous release, the version is refused for good, and the outcome is reported to the hub
//! on the next connection. One whose store and API came up but which did not reach the hub in
//! time (the link may just be down) is rolled back without refusal and tried again on a later
//! offer, [`CRASHES_MAX`] times at most.
//!
//! Every change to `current` and `state.json` is a durable atomic replace. What runs is
//! decided by `current` alone: the switch to a release and its trial are one write, and so
//! are the commit and a rollback; `state.json` only keeps what is worth telling and
//! remembering, so losing or misreading it never takes a release into service.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared::release::{ReleaseOffer, UpdateOutcome, UpdateReport, is_newer, this_target};

/// The worker exits with this code after switching `current` to a staged release.
pub const EXIT_UPDATE: u8 = 75;
/// Set by the keeper for its worker: the version of the release it runs.
pub const WORKER_ENV: &str = "OUTPOST_EDGE_WORKER";
/// Seconds a release in probation has to become healthy (default [`DEADLINE_DEFAULT`]).
pub const DEADLINE_ENV: &str = "OUTPOST_UPDATE_DEADLINE_S";
pub const DEADLINE_DEFAULT: Duration = Duration::from_secs(120);
/// Starts a release in probation may fail before it is rolled back.
pub const CRASHES_MAX: u32 = 3;
/// Pause between two starts of a release on trial.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How long a self-check may take.
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker asked to stop may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Outcomes kept (and told to the hub).
const REPORTS_KEPT: usize = shared::release::REPORTS_MAX;
pub const BINARY: &str = "outpost-edge";

/// The version this process runs: its release's when the keeper started it, else the build's.
pub fn running_version() -> String {
    std::env::var(WORKER_ENV).unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_owned())
}

/// The version a binary reports in `self-check`: the release directory it was installed in
/// (`releases/<version>/outpost-edge`), else the build's.
pub fn self_check_version() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?;
            let releases = dir.parent()?;
            (releases.file_name()? == "releases")
                .then(|| dir.file_name()?.to_str().map(str::to_owned))
                .flatten()
        })
        .filter(|v| shared::release::parse_version(v).is_ok())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// A release on trial: kept in `current` with its version (so the switch to it and its trial
/// are one atomic write), dropped from it once the release is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The release to return to.
    pub previous: String,
    /// Starts so far, counted before each start (a start the machine does not survive counts
    /// too).
    pub attempts: u32,
    /// The release opened its store and its API listens: only the hub is missing.
    #[serde(default)]
    pub local_ok: bool,
}

/// What `releases/current` says: the version to run, and its trial if it has not proven
/// healthy yet. On disk: the version on the first line, `trial <json>` on the second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub version: String,
    pub trial: Option<Trial>,
}

impl Current {
    /// A release in service.
    pub fn service(version: &str) -> Current {
        Current {
            version: version.to_owned(),
            trial: None,
        }
    }

    /// The trial of `version`, if this names it on trial.
    pub fn trial_of(&self, version: &str) -> Option<&Trial> {
        self.trial.as_ref().filter(|_| self.version == version)
    }

    fn parse(text: &str) -> Option<Current> {
        let mut lines = text.lines();
        let version = lines.next()?.trim();
        if version.is_empty() {
            return None;
        }
        // Written atomically, so a second line that does not parse is not expected; it would
        // leave the release running, in service.
        let trial = lines
            .next()
            .and_then(|l| l.strip_prefix("trial "))
            .and_then(|json| serde_json::from_str(json).ok());
        Some(Current {
            version: version.to_owned(),
            trial,
        })
    }

    fn render(&self) -> String {
        match &self.trial {
            None => format!("{}\n", self.version),
            Some(t) => format!(
                "{}\ntrial {}\n",
                self.version,
                serde_json::to_string(t).expect("a trial serialises")
            ),
        }
    }
}

/// `state.json`: what is worth keeping but never decides what runs. Read leniently: a field or
/// an outcome this build does not know (written by a newer release) is skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Versions never to try again, with why.
    #[serde(default)]
    pub refused: BTreeMap<String, String>,
    /// Rollbacks of a release that came up but could not reach the hub in time, by version:
    /// such a release is tried again on a later offer, at most [`CRASHES_MAX`] times.
    #[serde(default)]
    pub soft_rollbacks: BTreeMap<String, u32>,
    /// The release that ran before the current one (kept on disk, with the current one).
    #[serde(default)]
    pub previous: Option<String>,
    /// The latest outcomes, oldest first.
    #[serde(default, deserialize_with = "known_reports")]
    pub reports: Vec<UpdateReport>,
}

fn known_reports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<UpdateReport>, D::Error> {
    let values = Vec::<serde_json::Value>::deserialize(d)?;
    Ok(values
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect())
}

impl State {
    pub fn report(&mut self, version: &str, from: &str, outcome: UpdateOutcome, detail: &str) {
        let mut detail = detail.to_owned();
        if detail.len() > 240 {
            let mut end = 240;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        self.reports.push(UpdateReport {
            version: version.to_owned(),
            from: from.to_owned(),
            outcome,
            detail,
            at: now_micros(),
        });
        if self.reports.len() > REPORTS_KEPT {
            self.reports.remove(0);
        }
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The releases directory of a data dir.
#[derive(Debug, Clone)]
pub struct Releases {
    dir: PathBuf,
}

impl Releases {
    pub fn new(data_dir: &Path) -> Releases {
        Releases {
            dir: data_dir.join("releases"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn binary(&self, version: &str) -> PathBuf {
        self.dir.join(version).join(BINARY)
    }

    pub fn part_path(&self, version: &str) -> PathBuf {
        self.dir.join(format!("{version}.part"))
    }

    /// What `current` says, if it exists.
    pub fn current(&self) -> io::Result<Option<Current>> {
        match fs::read_to_string(self.dir.join("current")) {
            Ok(s) => Ok(Current::parse(&s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces `current`: new file, fsync, rename, fsync the directory.
    pub fn set_current(&self, current: &Current) -> io::Result<()> {
        write_atomic(&self.dir, "current", current.render().as_bytes())
    }

    /// Reads `state.json`. A file that does not parse (a hand edit, a damaged disk) is logged
    /// and read as empty: it holds no decision about what runs, and the next write replaces
    /// it.
    pub fn state(&self) -> io::Result<State> {
        let path = self.dir.join("state.json");
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!("releases/state.json cannot be read ({e}); read as empty");
                State::default()
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save_state(&self, state: &State) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).expect("the state serialises");
        write_atomic(&self.dir, "state.json", &bytes)
    }

    /// Changes the state under `f` and saves it.
    pub fn update_state(&self, f: impl FnOnce(&mut State)) -> io::Result<State> {
        let mut state = self.state()?;
        f(&mut state);
        self.save_state(&state)?;
        Ok(state)
    }

    /// On first start, installs the running binary as the first release (hard link when it
    /// can, a copy otherwise) and points `current` at it. Returns the current version.
    pub fn install_initial(&self) -> io::Result<String> {
        if let Some(c) = self.current()?
            && self.binary(&c.version).exists()
        {
            return Ok(c.version);
        }
        let version = env!("CARGO_PKG_VERSION");
        let exe = std::env::current_exe()?;
        let dir = self.dir.join(version);
        fs::create_dir_all(&dir)?;
        let target = dir.join(BINARY);
        let tmp = dir.join(format!("{BINARY}.tmp"));
        let _ = fs::remove_file(&tmp);
        if fs::hard_link(&exe, &tmp).is_err() {
            fs::copy(&exe, &tmp)?;
            fs::File::open(&tmp)?.sync_all()?;
        }
        fs::rename(&tmp, &target)?;
        sync_dir(&dir)?;
        sync_dir(&self.dir)?;
        self.set_current(&Current::service(version))?;
        tracing::info!(version, from = %exe.display(), "installed the running binary as the first release");
        Ok(version.to_owned())
    }

    /// Moves a verified download into `releases/<version>/outpost-edge`, executable, durable.
    pub fn stage(&self, version: &str, download: &Path) -> io::Result<PathBuf> {
        let dir = self.dir.join(version);
        fs::create_dir_all(&dir)?;
        let target = dir.join(BINARY);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(download, fs::Permissions::from_mode(0o755))?;
        }
        fs::File::open(download)?.sync_all()?;
        fs::rename(download, &target)?;
        sync_dir(&dir)?;
        sync_dir(&self.dir)?;
        Ok(target)
    }

    /// Removes every release but `keep` (their directories, downloads in progress, leftover
    /// temporary files): a branch that installs a release a week keeps two on disk, not fifty.
    pub fn prune(&self, keep: &[&str]) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let version = name.strip_suffix(".part").unwrap_or(&name);
            if keep.contains(&version) || shared::release::parse_version(version).is_err() {
                continue;
            }
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => tracing::info!(release = %name, "removed an old release"),
                Err(e) => tracing::warn!(release = %name, "cannot remove an old release: {e}"),
            }
        }
    }

    /// Bytes free for this process on the releases directory's file system.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let dir = if self.dir.exists() {
            self.dir.as_path()
        } else {
            self.dir.parent().unwrap_or(&self.dir)
        };
        let st = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Removes a release's files (a refused one).
    pub fn discard(&self, version: &str) {
        let _ = fs::remove_file(self.part_path(version));
        let _ = fs::remove_dir_all(self.dir.join(version));
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    // Per process: a keeper and a worker never write into each other's temporary file.
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The offer to take, if any: for this platform, newer than what runs, not refused.
pub fn choose(offers: &[ReleaseOffer], running: &str, state: &State) -> Option<ReleaseOffer> {
    let target = this_target();
    offers
        .iter()
        .filter(|o| o.target == target)
        .filter(|o| is_newer(&o.version, running))
        .filter(|o| !state.refused.contains_key(&o.version))
        .max_by(|a, b| {
            let v = |o: &ReleaseOffer| shared::release::parse_version(&o.version).ok();
            v(a).cmp(&v(b))
        })
        .cloned()
}

/// Checks the offer's signature with the hub's release key.
pub fn verify_signature(
    offer: &ReleaseOffer,
    key: Option<&ed25519_dalek::VerifyingKey>,
) -> Result<(), String> {
    let key = key.ok_or("the branch identity has no release key (release.pub)")?;
    let sig: [u8; 64] = offer
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| "the signature is not 64 bytes".to_owned())?;
    key.verify_strict(
        &offer.signed_message(),
        &ed25519_dalek::Signature::from_bytes(&sig),
    )
    .map_err(|_| "the signature does not verify with the hub's release key".to_owned())
}

/// Checks a complete download against the offer: size and blake3.
pub fn verify_download(offer: &ReleaseOffer, path: &Path) -> Result<(), String> {
    let mut f = fs::File::open(path).map_err(|e| format!("cannot read the download: {e}"))?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("cannot read the download: {e}"))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    if size != offer.size {
        return Err(format!(
            "{size} bytes arrived, the release has {}",
            offer.size
        ));
    }
    if hasher.finalize().as_bytes() != &offer.hash {
        return Err("the artifact's blake3 hash does not match the signed one".into());
    }
    Ok(())
}

/// Runs `binary self-check`: it must exit 0 within the time limit and print `version`.
pub fn self_check(binary: &Path, version: &str) -> Result<(), String> {
    let spawn = || {
        std::process::Command::new(binary)
            .arg("self-check")
            .env_remove(WORKER_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
    };
    // ETXTBSY: a file just written may still be open in a process forked meanwhile.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(26) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.map_err(|e| format!("self-check did not start: {e}"))?,
        }
    };
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > SELF_CHECK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "self-check did not finish within {}s",
                    SELF_CHECK_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("self-check: {e}")),
        }
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!("self-check failed ({status})"));
    }
    if !out.split_whitespace().any(|w| w == version) {
        return Err(format!(
            "self-check printed {:?}, not version {version}",
            out.trim()
        ));
    }
    Ok(())
}

/// `outpost-edge self-check`: the binary loads, its built-in schema is valid, it can make a
/// TLS configuration; prints its version.
pub fn run_self_check() -> Result<String, String> {
    let schema = shared::pos::schema();
    if schema.tables().is_empty() {
        return Err("the built-in schema has no tables".into());
    }
    let _ = rustls::crypto::ring::default_provider();
    Ok(format!("outpost-edge {}", self_check_version()))
}

fn deadline() -> Duration {
    std::env::var(DEADLINE_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(DEADLINE_DEFAULT, Duration::from_secs)
}

/// The keeper: runs the current release as a worker until it stops, starting the next
/// release after an update and rolling back one that does not come up. `args` are the
/// worker's arguments (`serve ...`).
pub fn keep(data_dir: &Path, args: Vec<OsString>) -> Result<ExitCode, String> {
    let releases = Releases::new(data_dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    // A worker of an earlier keeper (killed, restarted by the service manager) may still be
    // finishing: nothing is read before it is gone.
    runtime.block_on(wait_for_workers(data_dir));
    if let Err(e) = releases.install_initial() {
        // E.g. a data dir on a full disk: the keeper's own binary serves meanwhile.
        tracing::error!("cannot install the first release ({e}); running this binary");
    }
    runtime.block_on(keeper(releases, args))
}

/// Waits (up to [`STOP_GRACE`]) until no process holds the data dir's `edge.lock`.
async fn wait_for_workers(data_dir: &Path) {
    let Ok(file) = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("edge.lock"))
    else {
        return; // the worker reports what is wrong with the data dir
    };
    let until = tokio::time::Instant::now() + STOP_GRACE;
    while let Err(fs::TryLockError::WouldBlock) = file.try_lock() {
        if tokio::time::Instant::now() > until {
            tracing::warn!("another process still holds edge.lock; starting anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = file.unlock();
}

/// How a worker's run ended.
enum Ended {
    /// The keeper was asked to stop; the worker stopped with this code.
    Stopped(Option<i32>),
    /// The worker staged a new release and switched `current` to it.
    Update,
    /// The worker ended on its own (or never started).
    Exited(String, Option<i32>),
    /// The release on trial was not healthy within the deadline; the worker was stopped.
    /// `true`: the keeper was also asked to stop meanwhile (it stops after the rollback).
    Deadline(bool),
}

async fn keeper(releases: Releases, args: Vec<OsString>) -> Result<ExitCode, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let deadline_after = deadline();
    // Starts of each release on trial, also kept here: a disk that refuses writes must not
    // make a crashing release start forever.
    let mut starts: BTreeMap<String, u32> = BTreeMap::new();
    // A rollback `current` could not record: the previous release runs regardless.
    let mut fallback: Option<String> = None;
    loop {
        let Current { version, trial } = match fallback.clone() {
            Some(previous) => {
                match releases.set_current(&Current::service(&previous)) {
                    Ok(()) => fallback = None,
                    Err(e) => tracing::error!("still cannot roll back releases/current: {e}"),
                }
                Current::service(&previous)
            }
            None => read_current(&releases),
        };
        let mut trial = trial;
        if let Some(t) = trial.as_mut() {
            let attempts = t.attempts.max(starts.get(&version).copied().unwrap_or(0));
            if attempts >= CRASHES_MAX {
                let detail = format!(
                    "release {version} did not become healthy in {attempts} starts; rolled back to {}",
                    t.previous
                );
                roll_back(&releases, &version, t, detail, true, &mut fallback);
                starts.remove(&version);
                continue;
            }
            t.attempts = attempts + 1;
            t.local_ok = false;
            starts.insert(version.clone(), t.attempts);
            let on_disk = Current {
                version: version.clone(),
                trial: Some(t.clone()),
            };
            if let Err(e) = releases.set_current(&on_disk) {
                tracing::error!("cannot count the start in releases/current: {e}");
            }
        }
        let worker = Worker {
            releases: &releases,
            version: &version,
            args: &args,
            probation: trial.is_some(),
            deadline_after,
        };
        let ended = worker.run(&mut term, &mut int).await?;
        let deadline = matches!(ended, Ended::Deadline(_));
        let stop_after = matches!(ended, Ended::Deadline(true));
        let (why, code) = match ended {
            Ended::Stopped(code) => {
                // Stopped on request (a service restart): that start does not count against
                // a release on trial.
                if let Ok(Some(mut c)) = releases.current()
                    && c.version == version
                    && let Some(t) = c.trial.as_mut()
                {
                    t.attempts = t.attempts.saturating_sub(1);
                    if let Err(e) = releases.set_current(&c) {
                        tracing::warn!("cannot uncount the stopped start in releases/current: {e}");
                    }
                }
                return Ok(exit_code(code));
            }
            Ended::Update => {
                tracing::info!(%version, "keeper: the worker staged an update");
                starts.remove(&version);
                continue;
            }
            Ended::Exited(why, code) => (why, code),
            Ended::Deadline(_) => (
                format!("was not healthy within {}s", deadline_after.as_secs()),
                None,
            ),
        };
        // Still on trial? An unreadable `current` counts as yes (what was written before the
        // start): a release is never taken into service on a doubt.
        let now = match releases.current() {
            Ok(Some(c)) => c.trial_of(&version).cloned(),
            Ok(None) | Err(_) => trial.clone(),
        };
        let Some(t) = now else {
            starts.remove(&version);
            if stop_after {
                return Ok(ExitCode::SUCCESS);
            }
            if deadline {
                // Committed just as the deadline passed: start it again, in service.
                continue;
            }
            // A release in service stopped on its own: the edge stops with it.
            tracing::warn!(%version, "keeper: the worker ended: {why}");
            return Ok(exit_code(code));
        };
        if deadline && t.local_ok {
            // Store and API came up; only the hub was not reached (the link may simply be
            // down). Rolled back for now, tried again on a later offer, a few times at most.
            let soft = releases
                .state()
                .map(|s| s.soft_rollbacks.get(&version).copied().unwrap_or(0))
                .unwrap_or(0)
                + 1;
            let detail = format!(
                "release {version} did not reach the hub within {}s ({soft} of {CRASHES_MAX} tries); rolled back to {}",
                deadline_after.as_secs(),
                t.previous
            );
            roll_back(
                &releases,
                &version,
                &t,
                detail,
                soft >= CRASHES_MAX,
                &mut fallback,
            );
            starts.remove(&version);
        } else if deadline || t.attempts >= CRASHES_MAX {
            let detail = if deadline {
                format!("release {version} {why}; rolled back to {}", t.previous)
            } else {
                format!(
                    "release {version} {why}, {} times; rolled back to {}",
                    t.attempts, t.previous
                )
            };
            roll_back(&releases, &version, &t, detail, true, &mut fallback);
            starts.remove(&version);
        } else {
            tracing::warn!(
                "keeper: release {version} {why} (attempt {} of {CRASHES_MAX})",
                t.attempts
            );
            // A moment before the next try, for whatever made it fail to pass.
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        if stop_after {
            // Rolled back first: the next start runs the previous release.
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// What to run: `current`, or this binary's own version when `current` is missing or cannot
/// be read.
fn read_current(releases: &Releases) -> Current {
    let own = env!("CARGO_PKG_VERSION");
    match releases.current() {
        Ok(Some(c)) => c,
        Ok(None) => Current::service(own),
        Err(e) => {
            tracing::error!("cannot read releases/current ({e}); running this binary");
            Current::service(own)
        }
    }
}

/// Returns `current` to the release before `version` (one atomic write: the switch back ends
/// the trial), then records the outcome. `refuse`: never try this version again; otherwise
/// its soft rollbacks are counted. A `current` that cannot be written leaves the previous
/// release in `fallback`, run regardless.
fn roll_back(
    releases: &Releases,
    version: &str,
    trial: &Trial,
    detail: String,
    refuse: bool,
    fallback: &mut Option<String>,
) {
    tracing::error!("keeper: {detail}");
    if let Err(e) = releases.set_current(&Current::service(&trial.previous)) {
        tracing::error!(
            "cannot roll back releases/current ({e}); running {} regardless",
            trial.previous
        );
        *fallback = Some(trial.previous.clone());
    }
    let recorded = releases.update_state(|s| {
        if refuse {
            s.refused.insert(version.to_owned(), detail.clone());
            s.soft_rollbacks.remove(version);
        } else {
            *s.soft_rollbacks.entry(version.to_owned()).or_default() += 1;
        }
        s.report(version, &trial.previous, UpdateOutcome::RolledBack, &detail);
    });
    if let Err(e) = recorded {
        tracing::error!("cannot record the rollback of {version}: {e}");
    }
}

/// One run of a worker.
struct Worker<'a> {
    releases: &'a Releases,
    version: &'a str,
    args: &'a [OsString],
    probation: bool,
    deadline_after: Duration,
}

impl Worker<'_> {
    fn command(&self, binary: &Path, version: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(binary);
        command
            .args(self.args)
            .env(WORKER_ENV, version)
            .stdin(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    async fn run(
        &self,
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> Result<Ended, String> {
        let version = self.version;
        let mut child = match self
            .command(&self.releases.binary(version), version)
            .spawn()
        {
            Ok(child) => child,
            Err(e) if self.probation => {
                return Ok(Ended::Exited(format!("did not start: {e}"), None));
            }
            Err(e) => {
                // A release in service whose binary is gone or cannot run (a noexec mount, a
                // deleted file): the keeper's own binary serves rather than nothing.
                let own = env!("CARGO_PKG_VERSION");
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                tracing::error!(%version, "keeper: release cannot start ({e}); running this binary ({own})");
                self.command(&exe, own)
                    .spawn()
                    .map_err(|e| format!("cannot start the worker: {e}"))?
            }
        };
        tracing::info!(%version, probation = self.probation, "keeper: worker started");
        let mut probation = self.probation;
        let mut stdin = child.stdin.take();
        let mut deadline = probation.then(|| tokio::time::Instant::now() + self.deadline_after);
        let mut stopping = false;
        let mut timed_out = false;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut check = tokio::time::interval(Duration::from_millis(200));
        // The worker commits its release once healthy (an unreadable `current` is no commit).
        let committed = || {
            self.releases
                .current()
                .ok()
                .flatten()
                .is_some_and(|c| c.trial_of(version).is_none())
        };
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = term.recv() => stopping = true,
                _ = int.recv() => stopping = true,
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    deadline = None;
                    // A deadline that passes while the worker is stopping on request does not
                    // judge the release; one that passed first does (below).
                    if committed() {
                        probation = false;
                    } else if !stopping {
                        timed_out = true;
                    }
                }
                _ = async { tokio::time::sleep_until(kill_at.expect("guarded")).await }, if kill_at.is_some() => {
                    kill_at = None;
                    let _ = child.start_kill();
                }
                _ = check.tick(), if probation && !timed_out => {
                    if committed() {
                        probation = false;
                        deadline = None;
                    }
                }
            }
            if (stopping || timed_out) && kill_at.is_none() {
                // The pipe stays open: its end would make the worker exit at once.
                if let Some(pipe) = stdin.as_mut() {
                    use tokio::io::AsyncWriteExt;
                    let _ = pipe.write_all(b"stop\n").await;
                    let _ = pipe.flush().await;
                }
                kill_at = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
        };
        let status = status.map_err(|e| format!("waiting for the worker: {e}"))?;
        Ok(if timed_out {
            // Not healthy in time, whatever was asked after.
            Ended::Deadline(stopping)
        } else if stopping {
            Ended::Stopped(status.code())
        } else if status.code() == Some(i32::from(EXIT_UPDATE)) {
            Ended::Update
        } else if probation {
            Ended::Exited(
                format!("exited ({status}) before it was healthy"),
                status.code(),
            )
        } else {
            Ended::Exited(format!("exited ({status})"), status.code())
        })
    }
}

fn exit_code(code: Option<i32>) -> ExitCode {
    ExitCode::from(code.map_or(1, |c| u8::try_from(c).unwrap_or(1)))
}

/// In the worker: watches the keeper's pipe on stdin. `stop` asks for a clean shutdown; the
/// pipe's end means the keeper is gone, and the worker exits at once.
pub fn watch_keeper(stop: tokio::sync::watch::Sender<bool>) {
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match io::stdin().read_line(&mut line) {
                Ok(0) | Err(_) => {
                    eprintln!("outpost-edge: the keeper is gone; exiting");
                    std::process::exit(1);
                }
                Ok(_) if line.trim() == "stop" => {
                    let _ = stop.send(true);
                }
                Ok(_) => {}
            }
        }
    });
}

/// A test hook: `OUTPOST_FAULT_CUT_DOWNLOAD=N` drops the hub connection once, after N bytes of
/// a release download arrived, to prove the next connection resumes instead of restarting.
const CUT_ENV: &str = "OUTPOST_FAULT_CUT_DOWNLOAD";

/// Why an install attempt stopped.
enum Stop {
    /// The release is bad: refused for good, reported.
    Refuse(String),
    /// The link or the disk failed: tried again on the next offer (the download resumes).
    Retry(String),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct UpdateMetrics {
    pub downloads_started: std::sync::atomic::AtomicU64,
    pub downloads_resumed: std::sync::atomic::AtomicU64,
    pub bytes_downloaded: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    pub staged: std::sync::atomic::AtomicU64,
}

/// The worker's side of updates: takes the hub's offers, downloads over the sync connection,
/// verifies, self-checks, stages, switches `current` and asks the worker to hand over.
pub struct Updater {
    releases: Releases,
    running: String,
    release_key: Option<ed25519_dalek::VerifyingKey>,
    /// An install task is running.
    busy: std::sync::atomic::AtomicBool,
    /// The hub's latest offers and the connection they came on.
    latest: parking_lot::Mutex<Option<(quinn::Connection, Vec<ReleaseOffer>)>>,
    /// Bumped with every new set of offers.
    offers_seen: std::sync::atomic::AtomicU64,
    /// Turns true when a release is staged and `current` points at it.
    staged: tokio::sync::watch::Sender<bool>,
    /// Bumped whenever `state.json`'s reports change (the sync client then tells the hub).
    reports_changed: std::sync::atomic::AtomicU64,
    cut_at: parking_lot::Mutex<Option<u64>>,
    /// Versions refused by this process (even if `state.json` could not record it).
    refused: parking_lot::Mutex<std::collections::BTreeSet<String>>,
    pub metrics: UpdateMetrics,
}

/// Disk space a release download leaves free for the store (and its WAL), in bytes.
const DISK_RESERVE: u64 = 256 << 20;

/// First pause before an interrupted download is tried again on the same connection; it
/// doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

impl Updater {
    pub fn new(
        data_dir: &Path,
        running: &str,
        release_key: Option<ed25519_dalek::VerifyingKey>,
    ) -> std::sync::Arc<Updater> {
        std::sync::Arc::new(Updater {
            releases: Releases::new(data_dir),
            running: running.to_owned(),
            release_key,
            busy: Default::default(),
            latest: parking_lot::Mutex::new(None),
            offers_seen: Default::default(),
            staged: tokio::sync::watch::channel(false).0,
            reports_changed: Default::default(),
            cut_at: parking_lot::Mutex::new(
                std::env::var(CUT_ENV).ok().and_then(|v| v.parse().ok()),
            ),
            refused: Default::default(),
            metrics: UpdateMetrics::default(),
        })
    }

    /// Resolves once a release is staged (the worker then shuts down with [`EXIT_UPDATE`]).
    pub fn staged(&self) -> tokio::sync::watch::Receiver<bool> {
        self.staged.subscribe()
    }

    pub fn reports_generation(&self) -> u64 {
        self.reports_changed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The outcomes to tell the hub.
    pub fn reports(&self) -> Vec<UpdateReport> {
        self.releases.state().map(|s| s.reports).unwrap_or_default()
    }

    /// This release is on trial (not yet healthy). An unreadable `current` counts as yes: no
    /// update starts on a doubt.
    fn on_trial(&self) -> bool {
        match self.releases.current() {
            Ok(c) => c.is_some_and(|c| c.trial_of(&self.running).is_some()),
            Err(_) => true,
        }
    }

    /// Store open and API listening: if the hub is not reached in time, the keeper rolls back
    /// without refusing the release for good.
    pub fn locally_up(&self) {
        let Ok(Some(mut current)) = self.releases.current() else {
            return;
        };
        let Some(trial) = current
            .trial
            .as_mut()
            .filter(|_| current.version == self.running)
        else {
            return;
        };
        trial.local_ok = true;
        if let Err(e) = self.releases.set_current(&current) {
            tracing::error!("cannot record that release {} came up: {e}", self.running);
        }
    }

    /// The worker is healthy (store open, API listening, hub handshake done): a release in
    /// probation is committed.
    pub fn healthy(self: &std::sync::Arc<Self>) {
        let Ok(Some(current)) = self.releases.current() else {
            return;
        };
        let Some(trial) = current.trial_of(&self.running).cloned() else {
            return;
        };
        if let Err(e) = self.releases.set_current(&Current::service(&self.running)) {
            tracing::error!("cannot commit release {}: {e}", self.running);
            return;
        }
        let (running, previous) = (&self.running, &trial.previous);
        tracing::info!(version = %running, %previous, "release installed and healthy");
        let recorded = self.releases.update_state(|s| {
            s.soft_rollbacks.remove(running);
            s.previous = Some(previous.clone());
            s.report(
                running,
                previous,
                UpdateOutcome::Installed,
                "healthy: store open, API listening, hub handshake done",
            );
        });
        if let Err(e) = recorded {
            tracing::error!("cannot record the install of {running}: {e}");
        }
        self.reports_changed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.releases.prune(&[running, previous]);
        // Offers that arrived while on trial are considered now.
        self.kick();
    }

    /// The hub's offers arrived on `conn`: installs the best one in the background.
    pub fn offers(self: &std::sync::Arc<Self>, conn: &quinn::Connection, offers: &[ReleaseOffer]) {
        *self.latest.lock() = Some((conn.clone(), offers.to_vec()));
        self.offers_seen
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.kick();
    }

    /// Starts the install task unless it runs, a release is staged, or this release is still on
    /// trial (then [`Updater::healthy`] kicks again).
    fn kick(self: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        if *self.staged.borrow() || self.on_trial() || self.busy.swap(true, SeqCst) {
            return;
        }
        /// Clears `busy` however the task ends (a panic included).
        struct Idle<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Idle<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut seen = me.offers_seen.load(SeqCst);
            {
                let _idle = Idle(&me.busy);
                me.install_latest(&mut seen).await;
            }
            // Offers that came while the task was finishing are not left waiting.
            if me.offers_seen.load(SeqCst) != seen {
                me.kick();
            }
        });
    }

    /// Installs the best of the latest offers: a refused release makes room for the next best;
    /// an interrupted download is tried again, with growing pauses, while the connection lives.
    async fn install_latest(&self, seen: &mut u64) {
        let mut pause = RETRY_FIRST;
        loop {
            *seen = self.offers_seen.load(std::sync::atomic::Ordering::SeqCst);
            let Some((conn, offers)) = self.latest.lock().clone() else {
                return;
            };
            if conn.close_reason().is_some() {
                return;
            }
            let mut state = match self.releases.state() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot read the update state: {e}");
                    return;
                }
            };
            // Refusals this process made count even if the disk did not take them.
            for v in self.refused.lock().iter() {
                state.refused.entry(v.clone()).or_default();
            }
            let Some(offer) = choose(&offers, &self.running, &state) else {
                return;
            };
            let version = offer.version.clone();
            match self.install(&conn, &offer, &state).await {
                Ok(()) => return,
                Err(Stop::Refuse(why)) => self.refuse(&version, &why),
                Err(Stop::Retry(why)) => {
                    tracing::info!(%version, "release install interrupted (tried again in {}s): {why}", pause.as_secs());
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = conn.closed() => return,
                    }
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn refuse(&self, version: &str, why: &str) {
        tracing::warn!(%version, "release refused: {why}");
        self.refused.lock().insert(version.to_owned());
        self.metrics
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.releases.discard(version);
        let running = self.running.clone();
        if let Err(e) = self.releases.update_state(|s| {
            s.refused.insert(version.to_owned(), why.to_owned());
            s.report(version, &running, UpdateOutcome::Refused, why);
        }) {
            tracing::error!("cannot record the refusal of {version}: {e}");
        }
        self.reports_changed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn install(
        &self,
        conn: &quinn::Connection,
        offer: &ReleaseOffer,
        state: &State,
    ) -> Result<(), Stop> {
        verify_signature(offer, self.release_key.as_ref()).map_err(Stop::Refuse)?;
        let binary = self.releases.binary(&offer.version);
        let (offer2, binary2) = (offer.clone(), binary.clone());
        // Staged before (and rolled back for a missing hub): no need to fetch it again.
        let staged_before = tokio::task::spawn_blocking(move || {
            binary2.exists() && verify_download(&offer2, &binary2).is_ok()
        })
        .await
        .unwrap_or(false);
        if !staged_before {
            tracing::info!(version = %offer.version, size = offer.size, "downloading a release");
            // Refused, rolled-back and abandoned downloads give their room back first.
            let mut keep = vec![self.running.as_str(), offer.version.as_str()];
            keep.extend(state.previous.as_deref());
            self.releases.prune(&keep);
            let part = self.releases.part_path(&offer.version);
            let resumed = self.download(conn, offer, &part).await?;
            let (releases, offer2, part2) = (self.releases.clone(), offer.clone(), part.clone());
            tokio::task::spawn_blocking(move || -> Result<(), Stop> {
                if let Err(why) = verify_download(&offer2, &part2) {
                    if resumed {
                        // The bytes kept from an earlier connection may be what is wrong:
                        // one more try from the first byte before the release is refused.
                        let _ = fs::remove_file(&part2);
                        return Err(Stop::Retry(format!(
                            "{why}; downloading it again from the start"
                        )));
                    }
                    return Err(Stop::Refuse(why));
                }
                releases
                    .stage(&offer2.version, &part2)
                    .map(|_| ())
                    .map_err(|e| Stop::Retry(format!("cannot stage the release: {e}")))
            })
            .await
            .map_err(|e| Stop::Retry(e.to_string()))??;
        }
        let version = offer.version.clone();
        tokio::task::spawn_blocking(move || self_check(&binary, &version))
            .await
            .map_err(|e| Stop::Retry(e.to_string()))?
            .map_err(Stop::Refuse)?;
        // The switch and the trial are one write: the keeper starts it on trial.
        let switch = Current {
            version: offer.version.clone(),
            trial: Some(Trial {
                previous: self.running.clone(),
                attempts: 0,
                local_ok: false,
            }),
        };
        self.releases
            .set_current(&switch)
            .map_err(|e| Stop::Retry(format!("cannot switch releases/current: {e}")))?;
        self.metrics
            .staged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(version = %offer.version, "release verified and staged; handing over");
        self.staged.send_replace(true);
        Ok(())
    }

    /// Downloads the artifact into `part`, resuming from what it already holds. Returns
    /// whether it resumed.
    async fn download(
        &self,
        conn: &quinn::Connection,
        offer: &ReleaseOffer,
        part: &Path,
    ) -> Result<bool, Stop> {
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::AsyncWriteExt;
        let retry = |e: &dyn std::fmt::Display| Stop::Retry(e.to_string());
        fs::create_dir_all(self.releases.dir()).map_err(|e| retry(&e))?;
        let mut offset = fs::metadata(part).map_or(0, |m| m.len());
        if offset > offer.size {
            fs::remove_file(part).map_err(|e| retry(&e))?;
            offset = 0;
        }
        let resumed = offset > 0;
        if offset == offer.size {
            return Ok(resumed);
        }
        // The store shares the disk: a download never takes the room its writes need.
        let needed = (offer.size - offset).saturating_add(DISK_RESERVE);
        match self.releases.free_bytes() {
            Ok(free) if free < needed => {
                tracing::error!(
                    version = %offer.version,
                    free,
                    needed,
                    "not enough disk space to download a release"
                );
                return Err(Stop::Retry(format!(
                    "not enough disk space: {free} bytes free, {needed} needed (the release plus {DISK_RESERVE} kept for the store)"
                )));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot tell the free disk space: {e}"),
        }
        self.metrics.downloads_started.fetch_add(1, Relaxed);
        if offset > 0 {
            self.metrics.downloads_resumed.fetch_add(1, Relaxed);
            tracing::info!(version = %offer.version, offset, "resuming a release download");
        }
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| retry(&e))?;
        let fetch = shared::wire::Frame::FetchFor {
            version: offer.version.clone(),
            target: offer.target.clone(),
            offset,
        };
        send.write_all(&fetch.encode())
            .await
            .map_err(|e| retry(&e))?;
        let _ = send.finish();
        let mut reader = shared::wire::FrameReader::default();
        let header = loop {
            if let Some(f) = reader.next_frame().map_err(|e| retry(&e))? {
                break f;
            }
            match recv
                .read_chunk(64 * 1024, true)
                .await
                .map_err(|e| retry(&e))?
            {
                Some(c) => reader.push(&c.bytes),
                None => return Err(Stop::Retry("the hub ended the download early".into())),
            }
        };
        match header {
            shared::wire::Frame::Artifact {
                version,
                size,
                offset: at,
            } if version == offer.version && size == offer.size && at == offset => {}
            shared::wire::Frame::Close { reason } => {
                return Err(Stop::Retry(format!(
                    "the hub refused the download: {reason}"
                )));
            }
            other => {
                return Err(Stop::Retry(format!(
                    "the hub answered the download with {other:?}"
                )));
            }
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .await
            .map_err(|e| retry(&e))?;
        let mut pending = reader.into_rest();
        loop {
            if !pending.is_empty() {
                offset += pending.len() as u64;
                if offset > offer.size {
                    return Err(Stop::Refuse(format!(
                        "the hub sent more than the release's {} bytes",
                        offer.size
                    )));
                }
                file.write_all(&pending).await.map_err(|e| retry(&e))?;
                self.metrics
                    .bytes_downloaded
                    .fetch_add(pending.len() as u64, Relaxed);
                let cut = {
                    let mut cut_at = self.cut_at.lock();
                    let hit = cut_at.is_some_and(|n| offset >= n);
                    if hit {
                        *cut_at = None;
                    }
                    hit
                };
                if cut {
                    file.sync_all().await.map_err(|e| retry(&e))?;
                    tracing::warn!(offset, "test hook: cutting the hub link mid-download");
                    conn.close(0u32.into(), b"test hook: download cut");
                    return Err(Stop::Retry(format!("cut by the test hook at {offset}")));
                }
            }
            match recv.read_chunk(256 * 1024, true).await {
                Ok(Some(c)) => pending = c.bytes.to_vec(),
                Ok(None) => break,
                Err(e) => {
                    // Keep what arrived: the next connection resumes from it.
                    let _ = file.sync_all().await;
                    return Err(retry(&e));
                }
            }
        }
        file.sync_all().await.map_err(|e| retry(&e))?;
        if offset != offer.size {
            return Err(Stop::Retry(format!(
                "the download ended at {offset} of {} bytes",
                offer.size
            )));
        }
        Ok(resumed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn offer(key: &SigningKey, version: &str, bytes: &[u8]) -> ReleaseOffer {
        let mut o = ReleaseOffer {
            version: version.into(),
            target: this_target(),
            size: bytes.len() as u64,
            hash: *blake3::hash(bytes).as_bytes(),
            signature: Vec::new(),
        };
        o.signature = key.sign(&o.signed_message()).to_bytes().to_vec();
        o
    }

    #[test]
    fn choose_takes_the_newest_acceptable_release() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut state = State::default();
        let mut other = offer(&key, "0.9.0", b"x");
        other.target = "sparc-plan9".into();
        let offers = vec![
            offer(&key, "0.2.0", b"a"),
            offer(&key, "0.3.0", b"b"),
            offer(&key, "0.1.0", b"c"),
            other,
        ];
        assert_eq!(choose(&offers, "0.1.0", &state).unwrap().version, "0.3.0");
        state.refused.insert("0.3.0".into(), "bad".into());
        assert_eq!(choose(&offers, "0.1.0", &state).unwrap().version, "0.2.0");
        assert!(choose(&offers, "0.2.0", &state).is_none());
    }

    #[test]
    fn signatures_and_downloads_are_checked() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let stranger = SigningKey::from_bytes(&[2; 32]);
        let good = offer(&key, "0.2.0", b"release bytes");
        let public = key.verifying_key();
        assert!(verify_signature(&good, Some(&public)).is_ok());
        assert!(verify_signature(&good, None).is_err());
        let foreign = offer(&stranger, "0.2.0", b"release bytes");
        assert!(verify_signature(&foreign, Some(&public)).is_err());
        // Any signed field changed after signing breaks the signature.
        for mutate in [
            |o: &mut ReleaseOffer| o.version = "0.2.1".into(),
            |o: &mut ReleaseOffer| o.size += 1,
            |o: &mut ReleaseOffer| o.hash[0] ^= 1,
            |o: &mut ReleaseOffer| o.target = "x".into(),
        ] {
            let mut o = good.clone();
            mutate(&mut o);
            assert!(verify_signature(&o, Some(&public)).is_err());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        fs::write(&path, b"release bytes").unwrap();
        assert!(verify_download(&good, &path).is_ok());
        fs::write(&path, b"release bytez").unwrap();
        assert!(verify_download(&good, &path).unwrap_err().contains("hash"));
        fs::write(&path, b"release").unwrap();
        assert!(verify_download(&good, &path).unwrap_err().contains("bytes"));
    }

    fn trial(previous: &str, attempts: u32) -> Trial {
        Trial {
            previous: previous.into(),
            attempts,
            local_ok: false,
        }
    }

    fn version_of(r: &Releases) -> String {
        r.current().unwrap().unwrap().version
    }

    #[test]
    fn current_and_state_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        assert_eq!(r.current().unwrap(), None);
        assert_eq!(r.state().unwrap(), State::default());
        let v = r.install_initial().unwrap();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        assert!(r.binary(&v).exists());
        assert_eq!(r.current().unwrap(), Some(Current::service(&v)));
        // A second start keeps what is there, trial included.
        let on_trial = Current {
            version: "9.9.9".into(),
            trial: Some(trial(&v, 1)),
        };
        r.set_current(&on_trial).unwrap();
        fs::create_dir_all(dir.path().join("releases/9.9.9")).unwrap();
        fs::write(r.binary("9.9.9"), b"#!/bin/sh\n").unwrap();
        assert_eq!(r.install_initial().unwrap(), "9.9.9");
        let state = r
            .update_state(|s| s.report("9.9.9", &v, UpdateOutcome::Refused, "because"))
            .unwrap();
        let again = Releases::new(dir.path());
        assert_eq!(again.current().unwrap(), Some(on_trial.clone()));
        assert_eq!(again.state().unwrap(), state);
        assert_eq!(
            again.current().unwrap().unwrap().trial_of("9.9.9"),
            on_trial.trial.as_ref()
        );
        assert_eq!(again.current().unwrap().unwrap().trial_of(&v), None);
        let leftovers: Vec<_> = fs::read_dir(r.dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn current_reads_the_version_line_and_an_optional_trial() {
        let c = Current::parse("1.2.3\n").unwrap();
        assert_eq!(c, Current::service("1.2.3"));
        let t = Current {
            version: "1.3.0".into(),
            trial: Some(Trial {
                previous: "1.2.3".into(),
                attempts: 2,
                local_ok: true,
            }),
        };
        assert_eq!(Current::parse(&t.render()), Some(t.clone()));
        // The first line is what the earlier layout held: an old reader still finds the version.
        assert_eq!(t.render().lines().next(), Some("1.3.0"));
        assert_eq!(Current::parse(""), None);
        assert_eq!(Current::parse("\n"), None);
        // A trial line that does not parse leaves the version (it was written atomically, so
        // this is not expected).
        assert_eq!(
            Current::parse("1.3.0\ntrial {"),
            Some(Current::service("1.3.0"))
        );
    }

    #[test]
    fn rollbacks_refuse_or_count() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        let t = trial("0.1.0", 1);
        let on_trial = Current {
            version: "0.2.0".into(),
            trial: Some(t.clone()),
        };
        r.set_current(&on_trial).unwrap();
        let mut fallback = None;
        roll_back(&r, "0.2.0", &t, "no hub".into(), false, &mut fallback);
        let state = r.state().unwrap();
        assert_eq!(r.current().unwrap(), Some(Current::service("0.1.0")));
        assert_eq!(fallback, None);
        assert_eq!(state.soft_rollbacks.get("0.2.0"), Some(&1));
        assert!(!state.refused.contains_key("0.2.0"), "tried again later");
        assert_eq!(
            state.reports.last().unwrap().outcome,
            UpdateOutcome::RolledBack
        );

        r.set_current(&on_trial).unwrap();
        roll_back(&r, "0.2.0", &t, "crashed".into(), true, &mut fallback);
        let state = r.state().unwrap();
        assert_eq!(version_of(&r), "0.1.0");
        assert_eq!(
            state.refused.get("0.2.0").map(String::as_str),
            Some("crashed")
        );
        assert!(state.soft_rollbacks.is_empty());
        assert_eq!(state.reports.len(), 2);
    }

    #[test]
    fn a_rollback_that_cannot_be_written_still_runs_the_previous_release() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        let t = trial("0.1.0", 3);
        r.set_current(&Current {
            version: "0.2.0".into(),
            trial: Some(t.clone()),
        })
        .unwrap();
        // `current` cannot be replaced (a non-empty directory in its place: even root's
        // rename fails).
        fs::remove_file(r.dir().join("current")).unwrap();
        fs::create_dir_all(r.dir().join("current/x")).unwrap();
        let mut fallback = None;
        roll_back(&r, "0.2.0", &t, "crashed".into(), true, &mut fallback);
        assert_eq!(fallback.as_deref(), Some("0.1.0"));
        // The outcome is still recorded.
        assert!(r.state().unwrap().refused.contains_key("0.2.0"));
    }

    #[test]
    fn state_from_a_newer_release_or_a_damaged_disk_does_not_stop_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        let at = now_micros();
        // A newer release's outcome kind and field: skipped, the rest kept.
        let newer = serde_json::json!({
            "refused": {"0.2.5": "bad"},
            "reports": [
                {"version": "0.2.5", "from": "0.2.0", "outcome": "Refused", "detail": "bad", "at": at},
                {"version": "0.2.6", "from": "0.2.0", "outcome": "Quarantined", "detail": "?", "at": at}
            ],
            "channel": "beta"
        });
        fs::create_dir_all(r.dir()).unwrap();
        fs::write(r.dir().join("state.json"), newer.to_string()).unwrap();
        let state = r.state().unwrap();
        assert_eq!(state.refused.len(), 1);
        assert_eq!(state.reports.len(), 1);
        assert_eq!(state.reports[0].version, "0.2.5");
        // Not JSON at all: read as empty, and left for the next write to replace.
        fs::write(r.dir().join("state.json"), b"\0\0garbage").unwrap();
        assert_eq!(r.state().unwrap(), State::default());
        let state = r
            .update_state(|s| s.previous = Some("0.1.0".into()))
            .unwrap();
        assert_eq!(r.state().unwrap(), state);
    }

    #[test]
    fn prune_keeps_the_current_and_previous_releases_only() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        for v in ["0.1.0", "0.2.0", "0.3.0"] {
            fs::create_dir_all(r.dir().join(v)).unwrap();
            fs::write(r.binary(v), b"bin").unwrap();
        }
        fs::write(r.part_path("0.4.0"), b"half").unwrap();
        fs::write(r.part_path("0.3.0"), b"half").unwrap();
        r.set_current(&Current::service("0.3.0")).unwrap();
        r.save_state(&State::default()).unwrap();
        r.prune(&["0.3.0", "0.2.0"]);
        let mut left: Vec<String> = fs::read_dir(r.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["0.2.0", "0.3.0", "0.3.0.part", "current", "state.json"]
        );
        assert!(r.binary("0.2.0").exists());
        assert!(r.free_bytes().unwrap() > 0);
    }

    #[test]
    fn reports_are_bounded_and_details_cut_at_a_character() {
        let mut s = State::default();
        for i in 0..(REPORTS_KEPT + 5) {
            s.report(
                &format!("0.{i}.0"),
                "0.1.0",
                UpdateOutcome::Refused,
                &"é".repeat(200),
            );
        }
        assert_eq!(s.reports.len(), REPORTS_KEPT);
        assert_eq!(s.reports[0].version, "0.5.0");
        assert!(s.reports.iter().all(|r| r.detail.len() <= 240));
    }

    #[test]
    fn self_check_runs_the_binary_and_wants_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            fs::write(&p, body).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            }
            p
        };
        let ok = script("ok", "#!/bin/sh\necho \"outpost-edge 1.2.3\"\n");
        assert!(self_check(&ok, "1.2.3").is_ok());
        assert!(
            self_check(&ok, "1.2.4")
                .unwrap_err()
                .contains("not version")
        );
        let fails = script("fails", "#!/bin/sh\nexit 1\n");
        assert!(self_check(&fails, "1.2.3").unwrap_err().contains("failed"));
        assert!(self_check(&dir.path().join("missing"), "1.2.3").is_err());
    }
}
