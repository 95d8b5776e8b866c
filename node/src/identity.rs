//! The node's long-lived ed25519 key pair, kept in the data directory so its peer id is stable.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p_identity::{Keypair, PeerId};

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Why the key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The key file holds something else than a key.
    #[error("{path} is not a grid node key ({detail}); move it away to create a new identity")]
    Damaged {
        /// The key file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The key file is readable by others.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// Loads the key in `data_dir`, creating one (mode 0600, written atomically) if there is none.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let io = |op| {
        let path = path.clone();
        move |source| IdentityError::Io { op, path, source }
    };
    match fs::read(&path) {
        Ok(bytes) => {
            let mode = fs::metadata(&path).map_err(io("stat"))?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Exposed { path, mode });
            }
            Keypair::from_protobuf_encoding(&bytes)
                .map_err(|e| IdentityError::Damaged { path, detail: e.to_string() })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir).map_err(io("create"))?;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().expect("ed25519 keys encode");
            let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create"))?;
            f.write_all(&bytes).map_err(io("write"))?;
            f.sync_all().map_err(io("sync"))?;
            fs::rename(&tmp, &path).map_err(io("rename"))?;
            Ok(key)
        }
        Err(e) => Err(io("read")(e)),
    }
}

/// The peer id of a key pair.
pub fn peer_id(key: &Keypair) -> PeerId {
    key.public().to_peer_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_id_survives_a_restart_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = peer_id(&load_or_create(dir.path()).unwrap());
        let b = peer_id(&load_or_create(dir.path()).unwrap());
        assert_eq!(a, b);
        let key = dir.path().join(KEY_FILE);
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_create(dir.path()), Err(IdentityError::Exposed { .. })));
        fs::write(&key, b"garbage").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a grid node key"), "{err}");
    }
}
