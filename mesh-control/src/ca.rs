//! The CA's files in the control plane's data directory, never in the
//! database: `ca/root.pem` (the root certificate, shareable),
//! `ca/root.key` and `ca/kek` (secrets, 0600), `ca/trust-domain`.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use mesh_identity::{CertificateAuthority, Kek};
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
}

/// The CA's files under a data directory.
#[derive(Debug, Clone)]
pub struct CaFiles {
    dir: PathBuf,
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
        }
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
        self.write("root.key", &ca.key_pem(), 0o600)?;
        self.write("kek", &format!("{kek_hex}\n"), 0o600)?;
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

    fn read_secret(&self, name: &str) -> Result<String, CaFilesError> {
        let path = self.dir.join(name);
        let mode = fs::metadata(&path).map_err(io(&path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaFilesError::Exposed { path, mode });
        }
        fs::read_to_string(&path).map_err(io(&path))
    }

    /// The CA and the KEK.
    pub fn load(&self) -> Result<(CertificateAuthority, Kek), CaFilesError> {
        let trust_domain_path = self.dir.join("trust-domain");
        let trust_domain =
            fs::read_to_string(&trust_domain_path).map_err(io(&trust_domain_path))?;
        let root_path = self.dir.join("root.pem");
        let root = fs::read_to_string(&root_path).map_err(io(&root_path))?;
        let ca = CertificateAuthority::from_pem(
            trust_domain.trim(),
            &root,
            &self.read_secret("root.key")?,
        )?;
        let kek = Kek::from_hex(&self.read_secret("kek")?).map_err(|source| CaFilesError::Kek {
            path: self.dir.join("kek"),
            source,
        })?;
        Ok((ca, kek))
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
}
