//! WireGuard keys: 32 bytes, base64 as `wg` and upstream write them, and the
//! node's private key file (`/run/flannel/wgkey`, `WIREGUARD_KEY_FILE`).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Where upstream keeps the private key.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";

/// A Curve25519 key (public, private or preshared).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({self})")
    }
}

impl std::str::FromStr for Key {
    type Err = String;
    fn from_str(s: &str) -> Result<Key, String> {
        decode(s).map(Key)
    }
}

/// Decodes one base64 32-byte key (surrounding whitespace allowed, as in a file).
pub fn decode(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 44 {
        return Err(format!(
            "{} characters, not the 44 of a base64 32-byte key",
            s.len()
        ));
    }
    let b = STANDARD.decode(s).map_err(|e| e.to_string())?;
    b.try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes, not 32", b.len()))
}

impl Key {
    /// A new private key, clamped as `wg genkey` makes them.
    pub fn generate() -> Key {
        use rand::RngCore;
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Key(k)
    }

    /// The public key of this private key.
    pub fn public(&self) -> Key {
        let secret = boringtun::x25519::StaticSecret::from(self.0);
        Key(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }

    /// Lowercase hex, as the cross-platform configuration protocol writes keys.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the configuration protocol's hex form.
    pub fn from_hex(s: &str) -> Result<Key, String> {
        if s.len() != 64 || !s.is_ascii() {
            return Err(format!("{s:?} is not a 64-digit hex key"));
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("{s:?} is not a hex key"))?;
        }
        Ok(Key(k))
    }
}

/// The key file: `WIREGUARD_KEY_FILE`, else upstream's path.
pub fn key_file() -> PathBuf {
    std::env::var_os("WIREGUARD_KEY_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE))
}

/// The node's private key: read from `path`, or generated and written there
/// (mode 0400, base64, as upstream) when the file does not exist. The bool
/// says whether it was generated. A file that exists but holds no key is an
/// error: replacing it would silently change the published key.
pub fn load_or_create(path: &Path) -> anyhow::Result<(Key, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let k = decode(&text)
                .map_err(|e| anyhow::anyhow!("{} holds no WireGuard key: {e}", path.display()))?;
            Ok((Key(k), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = Key::generate();
            write_key(path, &k)?;
            Ok((k, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the key through a temporary file and a rename, so that a crash never
/// leaves a half-written key behind.
fn write_key(path: &Path, k: &Key) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(k.to_string().as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o400))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_base64_and_hex() {
        let k = Key::generate();
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<Key>().unwrap(), k);
        assert_eq!(Key::from_hex(&k.hex()).unwrap(), k);
        assert!("c2hvcnQ=".parse::<Key>().is_err());
        assert!("!".repeat(44).parse::<Key>().is_err());
        assert!(Key::from_hex("zz").is_err());
    }

    /// RFC 7748 §6.1's test vector: Alice's private key and its public key.
    #[test]
    fn public_key_is_curve25519_of_the_private() {
        let hex = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
        let public = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
        assert_eq!(
            Key::from_hex(hex).unwrap().public(),
            Key::from_hex(public).unwrap()
        );
    }

    #[test]
    fn key_file_is_created_once_with_mode_0400_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wgkey");
        let (k, created) = load_or_create(&path).unwrap();
        assert!(created);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), k.to_string());
        let (again, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again, k);
        // A key written by `wg genkey` (with its newline) is read as is.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, format!("{k}\n")).unwrap();
        assert_eq!(load_or_create(&path).unwrap(), (k, false));
        // Garbage is an error, never silently replaced.
        std::fs::write(&path, "not a key").unwrap();
        assert!(load_or_create(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key");
    }
}
