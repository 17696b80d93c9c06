//! The CA's files in the control plane's data directory, never in the
//! database: `ca/root.pem` (the signing root, shareable), `ca/root.key`
//! and `ca/kek` (secrets, 0600), `ca/trust-domain`; during a root rotation
//! also `ca/staged.pem` + `ca/staged.key` (the next root, trusted but not
//! yet signing) and `ca/trusted.pem` (old roots still trusted).
//!
//! A root rotation is make-before-break, in three steps:
//! 1. **stage**: a new root joins the trust bundle; nodes pick the bundle
//!    up with their next certificate (within one certificate lifetime);
//! 2. **activate**: the staged root signs from now on; the old one stays
//!    trusted while certificates it signed are alive;
//! 3. **retire**: the old root leaves the bundle.
//!
//! Every file is replaced by rename, so a crash leaves either the old or
//! the new file; an activation interrupted between its renames is
//! completed on the next load.
//!
//! With a [`SealKey`] (a file outside the data directory), the secret files
//! are sealed with it (AES-256-GCM, bound to what the file holds), so the
//! data volume or a backup of it holds no usable key. Plaintext files from
//! before the seal key are sealed in place on the first load with it.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use mesh_identity::{CertificateAuthority, Kek, RootInfo, kek::KekError};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde::Serialize;
use time::OffsetDateTime;

/// The default trust domain, as in Kubernetes.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why the CA's files could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CaFilesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{0}")]
    Ca(#[from] mesh_identity::ca::CaError),
    #[error("{path}: {source}")]
    Kek {
        path: PathBuf,
        #[source]
        source: mesh_identity::kek::KekError,
    },
    #[error("{0}")]
    Rotation(String),
    #[error(
        "cannot read the seal key file {path}: {source}; make one with `mesh-control seal-key --out {path}`"
    )]
    SealKeyUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the seal key file {path} must hold 64 hex characters (32 bytes); make one with `mesh-control seal-key --out PATH`"
    )]
    SealKeyMalformed { path: PathBuf },
    #[error(
        "{path} is sealed, but no seal key is configured: pass the seal key it was sealed with in --seal-key-file (MESH_SEAL_KEY_FILE)"
    )]
    SealKeyMissing { path: PathBuf },
    #[error("{path} does not open with the seal key in {seal_key}: {reason}")]
    SealKeyWrong {
        path: PathBuf,
        seal_key: PathBuf,
        reason: String,
    },
}

/// The key that seals the CA's secret files (`root.key`, `staged.key`,
/// `kek`) at rest. It lives outside the data directory (a Kubernetes
/// Secret on tmpfs, a file a KMS agent writes), so the data volume alone,
/// or a backup of it, holds no usable private key. Lose it and the sealed
/// files cannot be opened again.
#[derive(Debug)]
pub struct SealKey {
    key: Kek,
    path: PathBuf,
}

/// What a sealed file starts with; plaintext files (PEM, hex) never do.
const SEALED: &str = "mesh-sealed:";

/// The secret files of the CA directory, in the order they are sealed.
const SECRET_FILES: [&str; 3] = ["root.key", "staged.key", "kek"];

/// What a secret file's sealed content is bound to (the AEAD's associated
/// data): a sealed `kek` put in place of a sealed `root.key`, or the
/// reverse, does not open. `staged.key` becomes `root.key` by a rename when
/// it is activated, so both are bound to the role "a root's key".
fn seal_context(name: &str) -> &'static str {
    match name {
        "kek" => "mesh-control ca/kek",
        _ => "mesh-control ca/root key",
    }
}

impl SealKey {
    /// Reads a seal key file: 64 hex characters, readable by its owner
    /// only.
    pub fn read(path: &Path) -> Result<Self, CaFilesError> {
        let unreadable = |source| CaFilesError::SealKeyUnreadable {
            path: path.to_owned(),
            source,
        };
        // The mode of the file read, not of whatever the path named a
        // moment before.
        let mut file = fs::File::open(path).map_err(unreadable)?;
        let mode = file.metadata().map_err(unreadable)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaFilesError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).map_err(unreadable)?;
        let key = Kek::from_hex(&text).map_err(|_| CaFilesError::SealKeyMalformed {
            path: path.to_owned(),
        })?;
        Ok(Self {
            key,
            path: path.to_owned(),
        })
    }

    /// Makes a new random seal key in a new 0600 file at `path`; never
    /// replaces a file.
    pub fn create(path: &Path) -> Result<Self, CaFilesError> {
        let (key, text) = Kek::generate().map_err(|source| CaFilesError::Kek {
            path: path.to_owned(),
            source,
        })?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        file.write_all(format!("{text}\n").as_bytes())
            .map_err(io(path))?;
        file.sync_all().map_err(io(path))?;
        Ok(Self {
            key,
            path: path.to_owned(),
        })
    }

    /// The key's id (the first 8 bytes of its SHA-256, in hex): names the
    /// key in logs and errors without revealing it.
    pub fn id(&self) -> &str {
        self.key.id()
    }

    /// The file the key was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The CA the control plane runs, with its key-encryption key. A root
/// rotation swaps the CA whole; readers take a snapshot with [`Identity::ca`].
#[derive(Debug)]
pub struct Identity {
    ca: std::sync::RwLock<std::sync::Arc<CertificateAuthority>>,
    pub kek: Kek,
    /// Where rotations are written; `None` for a CA held only in memory.
    files: Option<CaFiles>,
    /// One rotation step at a time.
    rotation: tokio::sync::Mutex<()>,
    /// Bumped whenever the signing root or the bundle changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Identity {
    pub fn new(ca: CertificateAuthority, kek: Kek) -> Self {
        Self {
            ca: std::sync::RwLock::new(std::sync::Arc::new(ca)),
            kek,
            files: None,
            rotation: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// Persists rotations to `files` (where the CA was loaded from).
    pub fn with_files(mut self, files: CaFiles) -> Self {
        self.files = Some(files);
        self
    }

    /// The CA now.
    pub fn ca(&self) -> std::sync::Arc<CertificateAuthority> {
        self.ca.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Follows changes of the signing root and of the bundle.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn files(&self) -> Result<&CaFiles, CaFilesError> {
        self.files.as_ref().ok_or_else(|| {
            CaFilesError::Rotation("this control plane's CA has no files to rotate".into())
        })
    }

    /// The roots of the bundle with their state.
    pub fn roots(&self) -> Result<Vec<Root>, CaFilesError> {
        self.files()?.roots()
    }

    /// Reloads the CA from its files, keeping the configured lifetime.
    fn reload(&self) -> Result<(), CaFilesError> {
        let ttl = self.ca().ttl();
        let (ca, _) = self.files()?.load()?;
        let ca = ca.with_ttl(ttl)?;
        *self.ca.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(ca);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Step 1 of a root rotation: stage a new root (trusted, not signing).
    pub async fn stage_root(&self, now: OffsetDateTime) -> Result<Root, CaFilesError> {
        let _one = self.rotation.lock().await;
        let root = self.files()?.stage_root(now)?;
        self.reload()?;
        tracing::info!(
            serial = root.serial,
            "staged a new root; nodes trust it from their next certificate"
        );
        Ok(root)
    }

    /// Step 2: the staged root signs from now on. Unless `force`, only once
    /// a whole certificate lifetime has passed since it was staged, so
    /// every node has received it in a bundle and keeps trusting the
    /// control plane's renewed certificate.
    pub async fn activate_staged(
        &self,
        now: OffsetDateTime,
        force: bool,
    ) -> Result<(), CaFilesError> {
        let _one = self.rotation.lock().await;
        let files = self.files()?;
        let staged = files
            .roots()?
            .into_iter()
            .find(|r| r.state == RootState::Staged)
            .ok_or_else(|| {
                CaFilesError::Rotation(
                    "no root is staged: `meshctl ca rotate-root` stages one".into(),
                )
            })?;
        // Staged roots start BACKDATE before they were made.
        let staged_at = staged.not_before + mesh_identity::ca::BACKDATE;
        let ready_at = staged_at + self.ca().ttl();
        if now < ready_at && !force {
            return Err(CaFilesError::Rotation(format!(
                "root {} was staged at {staged_at}; nodes that have not renewed since may not trust it yet. \
                 Activate at or after {ready_at} (one certificate lifetime later), or pass --force",
                staged.serial
            )));
        }
        files.activate_staged()?;
        self.reload()?;
        tracing::info!(serial = staged.serial, "the staged root signs from now on");
        Ok(())
    }

    /// Step 3: the old root `serial` leaves the bundle. Unless `force`,
    /// refuses while `still_signed` (unexpired certificates that chain to
    /// it alone) is not zero.
    pub async fn retire_root(
        &self,
        serial: &str,
        still_signed: usize,
        force: bool,
    ) -> Result<Root, CaFilesError> {
        let _one = self.rotation.lock().await;
        if still_signed > 0 && !force {
            return Err(CaFilesError::Rotation(format!(
                "{still_signed} unexpired certificate(s) chain to root {serial}: their holders would be \
                 refused. Wait until they renew, or pass --force"
            )));
        }
        let root = self.files()?.retire_root(serial)?;
        self.reload()?;
        tracing::info!(serial, "retired a root");
        Ok(root)
    }
}

/// A root's part in the trust bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RootState {
    /// Signs new certificates.
    Signing,
    /// Trusted, and will sign once activated.
    Staged,
    /// Trusted for certificates it signed before a rotation.
    Retiring,
}

/// A root and its state.
#[derive(Clone, Debug, Serialize)]
pub struct Root {
    pub serial: String,
    pub state: RootState,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(skip)]
    pub pem: String,
}

/// The CA's files under a data directory.
#[derive(Debug, Clone)]
pub struct CaFiles {
    dir: PathBuf,
    /// Seals the secret files; `None` keeps them in plaintext (0600).
    seal: Option<Arc<SealKey>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaFilesError + '_ {
    move |source| CaFilesError::Io {
        path: path.to_owned(),
        source,
    }
}

impl CaFiles {
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("ca"),
            seal: None,
        }
    }

    /// Seals the secret files with `key`: new files are written sealed,
    /// and plaintext ones are sealed in place on [`CaFiles::load`].
    pub fn with_seal_key(mut self, key: SealKey) -> Self {
        self.seal = Some(Arc::new(key));
        self
    }

    /// The seal key, if any.
    pub fn seal_key(&self) -> Option<&SealKey> {
        self.seal.as_deref()
    }

    pub fn exists(&self) -> bool {
        self.dir.join("root.key").exists()
    }

    /// Creates a new root and KEK. Refuses to replace existing files.
    pub fn create(&self, trust_domain: &str) -> Result<(), CaFilesError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let ca = CertificateAuthority::generate(trust_domain, OffsetDateTime::now_utc())?;
        let (_, kek_hex) = Kek::generate().map_err(|source| CaFilesError::Kek {
            path: self.dir.join("kek"),
            source,
        })?;
        let key = self.sealed("root.key", &ca.key_pem())?;
        self.write("root.key", &key, 0o600)?;
        let kek = self.sealed("kek", &format!("{kek_hex}\n"))?;
        self.write("kek", &kek, 0o600)?;
        self.write("root.pem", ca.root_pem(), 0o644)?;
        self.write("trust-domain", &format!("{trust_domain}\n"), 0o644)?;
        Ok(())
    }

    fn write(&self, name: &str, contents: &str, mode: u32) -> Result<(), CaFilesError> {
        let path = self.dir.join(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(contents.as_bytes()).map_err(io(&path))
    }

    /// `plaintext` as secret file `name` holds it: sealed with the seal
    /// key, or as it is without one.
    fn sealed(&self, name: &str, plaintext: &str) -> Result<String, CaFilesError> {
        let Some(seal) = &self.seal else {
            return Ok(plaintext.to_owned());
        };
        let sealed = seal
            .key
            .seal(plaintext.as_bytes(), seal_context(name))
            .map_err(|source| CaFilesError::Kek {
                path: self.dir.join(name),
                source,
            })?;
        Ok(format!("{SEALED}{sealed}\n"))
    }

    /// A secret file as stored (sealed or not), refused if others may
    /// read it.
    fn read_stored_secret(&self, name: &str) -> Result<String, CaFilesError> {
        let path = self.dir.join(name);
        let mode = fs::metadata(&path).map_err(io(&path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaFilesError::Exposed { path, mode });
        }
        fs::read_to_string(&path).map_err(io(&path))
    }

    /// A secret file's plaintext, unsealed if it is sealed.
    fn read_secret(&self, name: &str) -> Result<String, CaFilesError> {
        let stored = self.read_stored_secret(name)?;
        let Some(sealed) = stored.trim().strip_prefix(SEALED) else {
            return Ok(stored);
        };
        let path = self.dir.join(name);
        let Some(seal) = &self.seal else {
            return Err(CaFilesError::SealKeyMissing { path });
        };
        let wrong = |reason: String| CaFilesError::SealKeyWrong {
            path: path.clone(),
            seal_key: seal.path.clone(),
            reason,
        };
        let plaintext = seal.key.open(sealed, seal_context(name)).map_err(|error| {
            wrong(match error {
                KekError::WrongKek { sealed_with, this } => format!(
                    "it was sealed with seal key {sealed_with}, and this is seal key {this}"
                ),
                KekError::Tampered => {
                    "it was altered, or is another file's sealed content".to_owned()
                }
                KekError::Malformed => "its sealed content is malformed".to_owned(),
                other => other.to_string(),
            })
        })?;
        String::from_utf8(plaintext).map_err(|_| wrong("its sealed content is not text".into()))
    }

    /// Seals, each in place, the secret files still in plaintext; does
    /// nothing without a seal key. Returns the files it sealed.
    pub fn seal_in_place(&self) -> Result<Vec<&'static str>, CaFilesError> {
        let Some(seal) = &self.seal else {
            return Ok(Vec::new());
        };
        let mut plaintext = Vec::new();
        for name in SECRET_FILES {
            if !self.dir.join(name).exists() {
                continue;
            }
            let stored = self.read_stored_secret(name)?;
            if stored.trim().starts_with(SEALED) {
                // Sealed already: with this key, or nothing is sealed, so
                // that no directory ends up sealed with two keys.
                self.read_secret(name)?;
            } else {
                plaintext.push((name, stored));
            }
        }
        let mut sealed = Vec::new();
        for (name, stored) in plaintext {
            self.replace(name, &self.sealed(name, &stored)?, 0o600)?;
            sealed.push(name);
        }
        if !sealed.is_empty() {
            tracing::info!(
                dir = %self.dir.display(),
                files = ?sealed,
                seal_key = seal.id(),
                "sealed the CA's plaintext secret files in place with the seal key"
            );
        }
        Ok(sealed)
    }

    /// The CA and the KEK. Seals plaintext secret files first if there is
    /// a seal key.
    pub fn load(&self) -> Result<(CertificateAuthority, Kek), CaFilesError> {
        self.seal_in_place()?;
        self.finish_activation()?;
        let trust_domain = self.trust_domain()?;
        let root = self.read("root.pem")?;
        let mut ca =
            CertificateAuthority::from_pem(&trust_domain, &root, &self.read_secret("root.key")?)?;
        let others = self.roots()?;
        for other in others.iter().filter(|r| r.state != RootState::Signing) {
            ca = ca.with_trusted_pem(&other.pem)?;
        }
        let kek = Kek::from_hex(&self.read_secret("kek")?).map_err(|source| CaFilesError::Kek {
            path: self.dir.join("kek"),
            source,
        })?;
        Ok((ca, kek))
    }

    fn trust_domain(&self) -> Result<String, CaFilesError> {
        Ok(self.read("trust-domain")?.trim().to_owned())
    }

    fn read(&self, name: &str) -> Result<String, CaFilesError> {
        let path = self.dir.join(name);
        fs::read_to_string(&path).map_err(io(&path))
    }

    fn read_optional(&self, name: &str) -> Result<Option<String>, CaFilesError> {
        let path = self.dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Replaces `name` by writing a temporary file and renaming it.
    fn replace(&self, name: &str, contents: &str, mode: u32) -> Result<(), CaFilesError> {
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        let _ = fs::remove_file(&temporary);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)
            .map_err(io(&temporary))?;
        file.write_all(contents.as_bytes())
            .map_err(io(&temporary))?;
        file.sync_all().map_err(io(&temporary))?;
        fs::rename(&temporary, &path).map_err(io(&path))?;
        // The rename itself survives a crash once the directory is synced.
        fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io(&self.dir))
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), CaFilesError> {
        let target = self.dir.join(to);
        fs::rename(self.dir.join(from), &target).map_err(io(&target))
    }

    /// Every root of the bundle, signing root first.
    pub fn roots(&self) -> Result<Vec<Root>, CaFilesError> {
        let mut roots = Vec::new();
        let mut add = |pem_text: &str, state: RootState| -> Result<(), CaFilesError> {
            for der in CertificateDer::pem_slice_iter(pem_text.as_bytes()) {
                let der = der.map_err(|e| CaFilesError::Rotation(format!("a root's PEM: {e}")))?;
                let info = RootInfo::of(&der)?;
                let pem = pem::encode_config(
                    &pem::Pem::new("CERTIFICATE", der.to_vec()),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                );
                roots.push(Root {
                    serial: info.serial,
                    state,
                    not_before: info.not_before,
                    not_after: info.not_after,
                    pem,
                });
            }
            Ok(())
        };
        add(&self.read("root.pem")?, RootState::Signing)?;
        if let Some(staged) = self.read_optional("staged.pem")? {
            add(&staged, RootState::Staged)?;
        }
        if let Some(trusted) = self.read_optional("trusted.pem")? {
            add(&trusted, RootState::Retiring)?;
        }
        Ok(roots)
    }

    /// Step 1: makes a new root and adds it to the bundle, not signing.
    pub fn stage_root(&self, now: OffsetDateTime) -> Result<Root, CaFilesError> {
        if self.dir.join("staged.pem").exists() {
            return Err(CaFilesError::Rotation(
                "a root is already staged: activate it first (`meshctl ca rotate-root --activate`)"
                    .into(),
            ));
        }
        let next = CertificateAuthority::generate(&self.trust_domain()?, now)?;
        // The key first: a staged.pem without its key would be unusable.
        self.replace(
            "staged.key",
            &self.sealed("staged.key", &next.key_pem())?,
            0o600,
        )?;
        self.replace("staged.pem", next.root_pem(), 0o644)?;
        self.roots()?
            .into_iter()
            .find(|r| r.state == RootState::Staged)
            .ok_or_else(|| CaFilesError::Rotation("the staged root did not read back".into()))
    }

    /// Step 2: the staged root signs from now on; the signing root joins
    /// the old roots still trusted.
    pub fn activate_staged(&self) -> Result<(), CaFilesError> {
        let Some(staged) = self.read_optional("staged.pem")? else {
            return Err(CaFilesError::Rotation(
                "no root is staged: `meshctl ca rotate-root` stages one".into(),
            ));
        };
        // Check the staged pair before touching anything.
        CertificateAuthority::from_pem(
            &self.trust_domain()?,
            &staged,
            &self.read_secret("staged.key")?,
        )?;
        let old_root = self.read("root.pem")?;
        let trusted = self.read_optional("trusted.pem")?.unwrap_or_default();
        self.replace("trusted.pem", &format!("{trusted}{old_root}"), 0o644)?;
        self.rename("staged.key", "root.key")?;
        self.rename("staged.pem", "root.pem")
    }

    /// Completes an activation that stopped after its key rename: root.key
    /// is the staged key while root.pem is still the old root.
    fn finish_activation(&self) -> Result<(), CaFilesError> {
        let Some(staged) = self.read_optional("staged.pem")? else {
            return Ok(());
        };
        if self.dir.join("staged.key").exists() {
            return Ok(());
        }
        let td = self.trust_domain()?;
        if CertificateAuthority::from_pem(&td, &staged, &self.read_secret("root.key")?).is_ok() {
            tracing::warn!("completing a root activation that was interrupted");
            self.rename("staged.pem", "root.pem")?;
        }
        Ok(())
    }

    /// Step 3: removes a retiring root from the bundle.
    pub fn retire_root(&self, serial: &str) -> Result<Root, CaFilesError> {
        let roots = self.roots()?;
        let Some(root) = roots.iter().find(|r| r.serial == serial) else {
            let known: Vec<&str> = roots.iter().map(|r| r.serial.as_str()).collect();
            return Err(CaFilesError::Rotation(format!(
                "no root with serial {serial:?}; the roots are {known:?}"
            )));
        };
        if root.state != RootState::Retiring {
            return Err(CaFilesError::Rotation(format!(
                "root {serial} is {:?}, not retiring: only an old root can be retired",
                root.state
            )));
        }
        let kept: String = roots
            .iter()
            .filter(|r| r.state == RootState::Retiring && r.serial != serial)
            .map(|r| r.pem.as_str())
            .collect();
        self.replace("trusted.pem", &kept, 0o644)?;
        Ok(root.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_created_once_with_private_modes_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_data_dir(dir.path());
        assert!(!files.exists());
        files.create("mesh.test").unwrap();
        assert!(files.exists());
        for (name, mode) in [("root.key", 0o600), ("kek", 0o600), ("root.pem", 0o644)] {
            let meta = fs::metadata(dir.path().join("ca").join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
        }
        let (ca, kek) = files.load().unwrap();
        assert_eq!(ca.trust_domain(), "mesh.test");
        assert_eq!(kek.id().len(), 16);
        // A second create never replaces the root.
        assert!(files.create("mesh.test").is_err());
        // A key readable by others is refused.
        let key = dir.path().join("ca/root.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(files.load(), Err(CaFilesError::Exposed { .. })));
    }

    fn states(files: &CaFiles) -> Vec<(String, RootState)> {
        files
            .roots()
            .unwrap()
            .into_iter()
            .map(|r| (r.serial, r.state))
            .collect()
    }

    #[test]
    fn a_root_rotates_in_three_steps_and_every_step_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_data_dir(dir.path());
        files.create("mesh.test").unwrap();
        let first = files.roots().unwrap()[0].serial.clone();
        let now = OffsetDateTime::now_utc();

        // Stage: trusted, not signing.
        let staged = files.stage_root(now).unwrap();
        assert_eq!(
            states(&files),
            [
                (first.clone(), RootState::Signing),
                (staged.serial.clone(), RootState::Staged)
            ]
        );
        assert!(matches!(
            files.stage_root(now),
            Err(CaFilesError::Rotation(_))
        ));
        let (ca, _) = files.load().unwrap();
        assert_eq!(ca.bundle().roots().len(), 2);
        assert_eq!(RootInfo::of(ca.root_der()).unwrap().serial, first);
        let meta = fs::metadata(dir.path().join("ca/staged.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        // Activate: the staged root signs, the first is retiring.
        files.activate_staged().unwrap();
        assert_eq!(
            states(&files),
            [
                (staged.serial.clone(), RootState::Signing),
                (first.clone(), RootState::Retiring)
            ]
        );
        let (ca, _) = files.load().unwrap();
        assert_eq!(RootInfo::of(ca.root_der()).unwrap().serial, staged.serial);
        assert_eq!(ca.bundle().roots().len(), 2);
        assert!(matches!(
            files.activate_staged(),
            Err(CaFilesError::Rotation(_))
        ));

        // Retire: only a retiring root, and then it is gone.
        assert!(matches!(
            files.retire_root(&staged.serial),
            Err(CaFilesError::Rotation(_))
        ));
        assert!(matches!(
            files.retire_root("00"),
            Err(CaFilesError::Rotation(_))
        ));
        files.retire_root(&first).unwrap();
        assert_eq!(states(&files), [(staged.serial, RootState::Signing)]);
        assert_eq!(files.load().unwrap().0.bundle().roots().len(), 1);
    }

    #[test]
    fn an_activation_interrupted_between_its_renames_is_completed_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_data_dir(dir.path());
        files.create("mesh.test").unwrap();
        let staged = files.stage_root(OffsetDateTime::now_utc()).unwrap();
        // The crash: trusted.pem written and the key renamed, root.pem not.
        let old = fs::read_to_string(dir.path().join("ca/root.pem")).unwrap();
        fs::write(dir.path().join("ca/trusted.pem"), old).unwrap();
        fs::rename(
            dir.path().join("ca/staged.key"),
            dir.path().join("ca/root.key"),
        )
        .unwrap();

        let (ca, _) = files.load().unwrap();
        assert_eq!(RootInfo::of(ca.root_der()).unwrap().serial, staged.serial);
        assert_eq!(ca.bundle().roots().len(), 2);
        assert!(!dir.path().join("ca/staged.pem").exists());
    }

    /// A seal key in a directory of its own, outside the data directory.
    fn new_seal_key(dir: &Path) -> PathBuf {
        let path = dir.join("seal-key");
        SealKey::create(&path).unwrap();
        path
    }

    fn sealed_with(data_dir: &Path, seal_key: &Path) -> CaFiles {
        CaFiles::in_data_dir(data_dir).with_seal_key(SealKey::read(seal_key).unwrap())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The issuer signs: a certificate it issues chains to `root_pem`.
    fn signs_under(ca: &CertificateAuthority, root_pem: &str) {
        let id = mesh_identity::SpiffeId::parse("spiffe://mesh.test/ns/shop/sa/web").unwrap();
        let (issued, _) = ca.issue_with_key(&id, OffsetDateTime::now_utc()).unwrap();
        let bundle = mesh_identity::TrustBundle::from_pem("mesh.test", root_pem).unwrap();
        let verified = mesh_identity::SpiffeVerifier::new(bundle)
            .verify_peer(
                &issued.der,
                &[],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .unwrap();
        assert_eq!(verified, id);
    }

    #[test]
    fn with_a_seal_key_no_secret_is_in_clear_and_the_files_load_back() {
        let data = tempfile::tempdir().unwrap();
        let secrets = tempfile::tempdir().unwrap();
        let seal_key = new_seal_key(secrets.path());
        assert_eq!(mode(&seal_key), 0o600);
        let files = sealed_with(data.path(), &seal_key);
        files.create("mesh.test").unwrap();

        let kek_hex = files.read_secret("kek").unwrap().trim().to_owned();
        assert_eq!(kek_hex.len(), 64);
        let key_pem = files.read_secret("root.key").unwrap();
        assert!(key_pem.contains("BEGIN PRIVATE KEY"), "{key_pem}");
        // The key's base64 lines, which a grep of the volume would find.
        let key_lines: Vec<&str> = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
            .collect();
        assert!(!key_lines.is_empty());
        for entry in fs::read_dir(data.path().join("ca")).unwrap() {
            let path = entry.unwrap().path();
            let text = fs::read_to_string(&path).unwrap();
            assert!(!text.contains("PRIVATE KEY"), "{}", path.display());
            assert!(!text.contains(&kek_hex), "{}", path.display());
            for line in &key_lines {
                assert!(!text.contains(line), "{}", path.display());
            }
        }
        for name in ["root.key", "kek"] {
            let path = data.path().join("ca").join(name);
            assert_eq!(mode(&path), 0o600, "{name}");
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.starts_with(SEALED), "{name}: {text}");
            assert!(!text.contains("BEGIN"), "{name}");
        }

        let (ca, kek) = files.load().unwrap();
        assert_eq!(ca.key_pem(), key_pem);
        let root_pem = fs::read_to_string(data.path().join("ca/root.pem")).unwrap();
        assert_eq!(ca.root_pem(), root_pem);
        assert_eq!(kek.id(), Kek::from_hex(&kek_hex).unwrap().id());
        // As a restarted control plane: the key read again from its file.
        let (again, kek_again) = sealed_with(data.path(), &seal_key).load().unwrap();
        assert_eq!(again.key_pem(), key_pem);
        assert_eq!(kek_again.id(), kek.id());
        signs_under(&again, &root_pem);
        // Nothing left to seal.
        assert!(files.seal_in_place().unwrap().is_empty());
    }

    #[test]
    fn sealed_files_do_not_load_without_their_seal_key() {
        let data = tempfile::tempdir().unwrap();
        let secrets = tempfile::tempdir().unwrap();
        let seal_key = new_seal_key(secrets.path());
        sealed_with(data.path(), &seal_key)
            .create("mesh.test")
            .unwrap();

        // No seal key configured.
        let error = CaFiles::in_data_dir(data.path()).load().unwrap_err();
        let CaFilesError::SealKeyMissing { path } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(path, &data.path().join("ca/root.key"));
        let message = error.to_string();
        assert!(
            message.contains("is sealed, but no seal key is configured"),
            "{message}"
        );
        assert!(message.contains("--seal-key-file"), "{message}");

        // Another seal key.
        let other = secrets.path().join("other-seal-key");
        SealKey::create(&other).unwrap();
        let error = sealed_with(data.path(), &other).load().unwrap_err();
        let CaFilesError::SealKeyWrong {
            path,
            seal_key: used,
            ..
        } = &error
        else {
            panic!("{error:?}");
        };
        assert_eq!(path, &data.path().join("ca/root.key"));
        assert_eq!(used, &other);
        let message = error.to_string();
        assert!(message.contains("was sealed with seal key"), "{message}");
        let key_hex = fs::read_to_string(&other).unwrap();
        assert!(!message.contains(key_hex.trim()), "{message}");

        // A plaintext file beside them is not sealed with the other key.
        CaFiles::in_data_dir(&data.path().join("elsewhere"))
            .create("mesh.test")
            .unwrap();
        fs::copy(
            data.path().join("elsewhere/ca/root.key"),
            data.path().join("ca/staged.key"),
        )
        .unwrap();
        assert!(matches!(
            sealed_with(data.path(), &other).seal_in_place(),
            Err(CaFilesError::SealKeyWrong { .. })
        ));
        let staged_key = fs::read_to_string(data.path().join("ca/staged.key")).unwrap();
        assert!(staged_key.contains("PRIVATE KEY"));
        fs::remove_file(data.path().join("ca/staged.key")).unwrap();

        // The sealed KEK swapped for the sealed root key does not open:
        // each is bound to what it holds.
        let ca = data.path().join("ca");
        fs::rename(ca.join("root.key"), ca.join("swap")).unwrap();
        fs::rename(ca.join("kek"), ca.join("root.key")).unwrap();
        fs::rename(ca.join("swap"), ca.join("kek")).unwrap();
        let error = sealed_with(data.path(), &seal_key).load().unwrap_err();
        let CaFilesError::SealKeyWrong { path, reason, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(path, &ca.join("root.key"));
        assert!(reason.contains("another file's sealed content"), "{reason}");
    }

    #[test]
    fn plaintext_files_are_sealed_in_place_on_the_first_load_with_a_seal_key() {
        let data = tempfile::tempdir().unwrap();
        let secrets = tempfile::tempdir().unwrap();
        // An older init, with a root staged: every secret file in clear.
        let plain = CaFiles::in_data_dir(data.path());
        plain.create("mesh.test").unwrap();
        plain.stage_root(OffsetDateTime::now_utc()).unwrap();
        let (before, kek_before) = plain.load().unwrap();
        let staged_key = plain.read_secret("staged.key").unwrap();
        assert!(staged_key.contains("PRIVATE KEY"));

        let seal_key = new_seal_key(secrets.path());
        let files = sealed_with(data.path(), &seal_key);
        let (ca, kek) = files.load().unwrap();
        for name in SECRET_FILES {
            let path = data.path().join("ca").join(name);
            assert_eq!(mode(&path), 0o600, "{name}");
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.starts_with(SEALED), "{name}: {text}");
        }
        assert!(!data.path().join("ca/.root.key.tmp").exists());
        assert_eq!(ca.key_pem(), before.key_pem());
        assert_eq!(ca.root_pem(), before.root_pem());
        assert_eq!(ca.bundle().roots(), before.bundle().roots());
        assert_eq!(kek.id(), kek_before.id());
        assert_eq!(files.read_secret("staged.key").unwrap(), staged_key);

        // Sealed once: the next load finds nothing to seal and the same CA.
        assert!(files.seal_in_place().unwrap().is_empty());
        let (again, kek_again) = sealed_with(data.path(), &seal_key).load().unwrap();
        assert_eq!(again.key_pem(), before.key_pem());
        assert_eq!(kek_again.id(), kek_before.id());
        // And the plaintext is gone: without the key it no longer loads.
        assert!(matches!(
            plain.load(),
            Err(CaFilesError::SealKeyMissing { .. })
        ));
    }

    #[test]
    fn a_sealed_root_rotates_in_three_steps_and_every_step_survives_a_reload() {
        let data = tempfile::tempdir().unwrap();
        let secrets = tempfile::tempdir().unwrap();
        let seal_key = new_seal_key(secrets.path());
        let files = sealed_with(data.path(), &seal_key);
        files.create("mesh.test").unwrap();
        let first = files.roots().unwrap()[0].serial.clone();
        let reload = || sealed_with(data.path(), &seal_key).load().unwrap();
        let stored = |name: &str| fs::read_to_string(data.path().join("ca").join(name)).unwrap();

        let staged = files.stage_root(OffsetDateTime::now_utc()).unwrap();
        assert_eq!(mode(&data.path().join("ca/staged.key")), 0o600);
        assert!(stored("staged.key").starts_with(SEALED));
        let staged_key = files.read_secret("staged.key").unwrap();
        let (ca, _) = reload();
        assert_eq!(RootInfo::of(ca.root_der()).unwrap().serial, first);
        assert_eq!(ca.bundle().roots().len(), 2);

        files.activate_staged().unwrap();
        assert!(stored("root.key").starts_with(SEALED));
        let (ca, _) = reload();
        assert_eq!(RootInfo::of(ca.root_der()).unwrap().serial, staged.serial);
        assert_eq!(ca.key_pem(), staged_key);
        assert_eq!(ca.bundle().roots().len(), 2);
        signs_under(&ca, &staged.pem);

        files.retire_root(&first).unwrap();
        assert_eq!(
            states(&files),
            [(staged.serial.clone(), RootState::Signing)]
        );
        let (ca, _) = reload();
        assert_eq!(ca.bundle().roots().len(), 1);
        assert_eq!(ca.key_pem(), staged_key);
        for entry in fs::read_dir(data.path().join("ca")).unwrap() {
            let path = entry.unwrap().path();
            let text = fs::read_to_string(&path).unwrap();
            assert!(!text.contains("PRIVATE KEY"), "{}", path.display());
        }
    }

    #[test]
    fn an_interrupted_activation_of_a_sealed_root_is_completed_on_load() {
        let data = tempfile::tempdir().unwrap();
        let secrets = tempfile::tempdir().unwrap();
        let seal_key = new_seal_key(secrets.path());
        let files = sealed_with(data.path(), &seal_key);
        files.create("mesh.test").unwrap();
        let staged = files.stage_root(OffsetDateTime::now_utc()).unwrap();
        // The crash: trusted.pem written and the key renamed, root.pem not.
        let ca_dir = data.path().join("ca");
        let old = fs::read_to_string(ca_dir.join("root.pem")).unwrap();
        fs::write(ca_dir.join("trusted.pem"), old).unwrap();
        fs::rename(ca_dir.join("staged.key"), ca_dir.join("root.key")).unwrap();

        let (ca, _) = sealed_with(data.path(), &seal_key).load().unwrap();
        assert_eq!(RootInfo::of(ca.root_der()).unwrap().serial, staged.serial);
        assert!(!ca_dir.join("staged.pem").exists());
    }

    #[test]
    fn a_seal_key_file_others_may_read_or_that_is_not_a_key_is_refused() {
        let secrets = tempfile::tempdir().unwrap();
        let path = new_seal_key(secrets.path());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = SealKey::read(&path).unwrap_err();
        assert!(
            matches!(&error, CaFilesError::Exposed { path: p, mode: 0o644 } if *p == path),
            "{error:?}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            SealKey::read(&path),
            Err(CaFilesError::Exposed { mode: 0o640, .. })
        ));

        let missing = secrets.path().join("missing");
        let error = SealKey::read(&missing).unwrap_err();
        assert!(
            matches!(&error, CaFilesError::SealKeyUnreadable { path, .. } if *path == missing),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("mesh-control seal-key"),
            "{error}"
        );

        let short = secrets.path().join("short");
        fs::write(&short, "abcd\n").unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            SealKey::read(&short),
            Err(CaFilesError::SealKeyMalformed { path }) if path == short
        ));

        // A key is never replaced by a new one.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let kept = fs::read_to_string(&path).unwrap();
        assert!(SealKey::create(&path).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), kept);
        assert_eq!(
            SealKey::read(&path).unwrap().id(),
            Kek::from_hex(&kept).unwrap().id()
        );
    }

    #[tokio::test]
    async fn activation_waits_a_certificate_lifetime_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_data_dir(dir.path());
        files.create("mesh.test").unwrap();
        let (ca, kek) = files.load().unwrap();
        let identity = Identity::new(ca, kek).with_files(files);
        let mut changes = identity.subscribe();
        let now = OffsetDateTime::now_utc();
        identity.stage_root(now).await.unwrap();
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(identity.ca().bundle().roots().len(), 2);

        let error = identity.activate_staged(now, false).await.unwrap_err();
        assert!(error.to_string().contains("or pass --force"), "{error}");
        let tomorrow = now + time::Duration::hours(24) + time::Duration::minutes(1);
        identity.activate_staged(tomorrow, false).await.unwrap();
        assert!(changes.has_changed().unwrap());

        let old = identity
            .roots()
            .unwrap()
            .into_iter()
            .find(|r| r.state == RootState::Retiring)
            .unwrap();
        let error = identity
            .retire_root(&old.serial, 3, false)
            .await
            .unwrap_err();
        assert!(
            error.to_string().starts_with("3 unexpired certificate(s)"),
            "{error}"
        );
        identity.retire_root(&old.serial, 3, true).await.unwrap();
        assert_eq!(identity.ca().bundle().roots().len(), 1);
    }
}
