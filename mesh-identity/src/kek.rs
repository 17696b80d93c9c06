//! The key-encryption key: private keys the CA generates for workloads
//! outside the mesh are stored sealed under it (AES-256-GCM, a fresh nonce
//! per record), never in plaintext. The KEK itself lives in a file, never in
//! the database; sealed values name the KEK that sealed them, so it can be
//! rotated.

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    digest::{SHA256, digest},
    rand::{SecureRandom as _, SystemRandom},
};

/// Why a sealed value could not be opened, or a KEK not made.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KekError {
    #[error("the KEK must be 64 hex characters (32 bytes)")]
    BadKey,
    #[error("sealed with KEK {sealed_with}, but this is KEK {this}")]
    WrongKek { sealed_with: String, this: String },
    #[error("the sealed value is not of the form v1:<kek id>:<nonce>:<ciphertext>")]
    Malformed,
    #[error("the sealed value was altered, or belongs to another record")]
    Tampered,
    #[error("no randomness available")]
    Random,
}

/// A 256-bit AES-GCM key with its id (the first 8 bytes of its SHA-256).
pub struct Kek {
    id: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Kek {
    /// A new random KEK and its hex form (for the 0600 file).
    pub fn generate() -> Result<(Self, String), KekError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KekError::Random)?;
        let text = hex(&bytes);
        Ok((Self::from_hex(&text)?, text))
    }

    /// The KEK from its hex form.
    pub fn from_hex(text: &str) -> Result<Self, KekError> {
        let bytes = unhex(text.trim())
            .filter(|b| b.len() == 32)
            .ok_or(KekError::BadKey)?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| KekError::BadKey)?;
        Ok(Self {
            id: hex(&digest(&SHA256, &bytes).as_ref()[..8]),
            key: LessSafeKey::new(key),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext`, bound to `context` (e.g. the record's key): a
    /// sealed value moved to another record does not open.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<String, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KekError::Random)?;
        let mut data = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| KekError::Random)?;
        Ok(format!("v1:{}:{}:{}", self.id, hex(&nonce), hex(&data)))
    }

    /// Opens a value sealed by [`Kek::seal`] with the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, KekError> {
        let mut parts = sealed.split(':');
        let (Some("v1"), Some(id), Some(nonce), Some(data), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(KekError::Malformed);
        };
        if id != self.id {
            return Err(KekError::WrongKek {
                sealed_with: id.to_owned(),
                this: self.id.clone(),
            });
        }
        let nonce: [u8; NONCE_LEN] = unhex(nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or(KekError::Malformed)?;
        let mut data = unhex(data).ok_or(KekError::Malformed)?;
        let plaintext = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| KekError::Tampered)?;
        Ok(plaintext.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_kek_and_context() {
        let (kek, text) = Kek::generate().unwrap();
        assert_eq!(text.len(), 64);
        let sealed = kek.seal(b"-----BEGIN PRIVATE KEY-----", "gw.edge").unwrap();
        assert!(!sealed.contains("BEGIN"));
        assert_eq!(
            kek.open(&sealed, "gw.edge").unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        // A fresh nonce each time.
        assert_ne!(kek.seal(b"x", "c").unwrap(), kek.seal(b"x", "c").unwrap());

        assert_eq!(kek.open(&sealed, "other.edge"), Err(KekError::Tampered));
        let (other, _) = Kek::generate().unwrap();
        assert!(matches!(
            other.open(&sealed, "gw.edge"),
            Err(KekError::WrongKek { .. })
        ));
        let mut flipped = sealed.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(kek.open(&flipped, "gw.edge"), Err(KekError::Tampered));
        assert_eq!(kek.open("v2:x:y:z", "gw.edge"), Err(KekError::Malformed));
        assert_eq!(Kek::from_hex("abcd").unwrap_err(), KekError::BadKey);
        assert_eq!(Kek::from_hex(&text).unwrap().id(), kek.id());
    }
}
