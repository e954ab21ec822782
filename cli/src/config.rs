//! Where the control plane is and how to prove who we are: environment
//! (`GLOBALSTACKS_API_URL`, `GLOBALSTACKS_API_TOKEN`,
//! `GLOBALSTACKS_API_CA_FILE`) over the config file that `gstacks login`
//! writes (0600) under the user's config dir.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

pub const API_URL: &str = "GLOBALSTACKS_API_URL";
pub const API_TOKEN: &str = "GLOBALSTACKS_API_TOKEN";
pub const API_CA_FILE: &str = "GLOBALSTACKS_API_CA_FILE";

/// The config file's contents.
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub url: Option<String>,
    pub token: Option<String>,
    /// PEM of the certificate (or CA) the control plane presents.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .finish()
    }
}

/// What a command connects with.
#[derive(Clone)]
pub struct Resolved {
    pub url: String,
    pub token: String,
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// `$XDG_CONFIG_HOME/gstacks/config.toml`, else `~/.config/gstacks/config.toml`.
pub fn config_path() -> anyhow::Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("gstacks/config.toml"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_CONFIG_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".config/gstacks/config.toml"))
}

pub fn read_file(path: &Path) -> anyhow::Result<Option<FileConfig>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let config = toml::from_str(&text).map_err(|err| {
        anyhow::anyhow!(
            "{}: {}",
            path.display(),
            err.message().lines().next().unwrap_or("invalid TOML")
        )
    })?;
    Ok(Some(config))
}

/// Writes the config file 0600 (directory 0700), replacing it atomically.
pub fn write_file(path: &Path, config: &FileConfig) -> anyhow::Result<()> {
    let dir = path.parent().context("config path has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let text = toml::to_string(config).context("encoding the config")?;
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

pub fn read_ca_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading CA file {}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        bail!("CA file {} holds no PEM certificate", path.display());
    }
    Ok(pem)
}

/// Environment first, then the config file; names what is missing.
pub fn resolve() -> anyhow::Result<Resolved> {
    let path = config_path()?;
    let file = read_file(&path)?.unwrap_or_default();
    if let Ok(meta) = std::fs::metadata(&path) {
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "{} holds a token but is readable by others (mode {:o}); run `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            );
        }
    }
    let url = env(API_URL)
        .or(file.url)
        .with_context(|| format!("no control plane URL: set {API_URL} or run `gstacks login`"))?;
    let token = env(API_TOKEN)
        .or(file.token)
        .with_context(|| format!("no operator token: set {API_TOKEN} or run `gstacks login`"))?;
    let ca_pem = match env(API_CA_FILE) {
        Some(ca) => read_ca_file(Path::new(&ca))?,
        None => file.ca_pem.map(String::into_bytes).with_context(|| {
            format!("no certificate to trust: set {API_CA_FILE} (the control plane's cert.pem) or run `gstacks login --ca`")
        })?,
    };
    Ok(Resolved { url, token, ca_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_written_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gstacks/config.toml");
        let config = FileConfig {
            url: Some("https://127.0.0.1:7443".into()),
            token: Some("gsto.op_1.secret".into()),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\n".into()),
        };
        write_file(&path, &config).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_file(&path).unwrap(), Some(config.clone()));
        // Rewriting keeps the mode.
        write_file(&path, &config).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn unknown_key_and_bad_toml_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "urll = \"x\"\n").unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("urll"), "{err}");
        std::fs::write(&path, "url = \n").unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("config.toml"), "{err}");
        assert!(read_file(&dir.path().join("none.toml")).unwrap().is_none());
    }
}
