//! Stream entries sealed with the run's token: every entry carries a tag
//! (field `m`) that authenticates the stream's name, its id field and its
//! payload under a key derived from the token every process of the run holds.
//! A consumer with the key drops, and counts, an entry whose tag is missing
//! or wrong: one written by something that does not hold the token (a pod
//! that reached Redis), or moved from another stream. Without a token (a run
//! on loopback) entries are not sealed and no tag is checked.
//!
//! The tag is ChaCha20-Poly1305's (RFC 8439) over the payload as associated
//! data and the stream's name and id as plaintext, whose ciphertext is not
//! sent: the checker seals the same and compares tags, so the payload is
//! never copied. A 96-bit nonce per entry travels with the tag; each process
//! draws a random first nonce and counts up from it, so no two entries share
//! one. On this project's 2-core machine it tags a 5 KB entry in 1.6 µs,
//! where HMAC-SHA-256 took 2.9 µs and AES-256-GCM 2.7 µs (ring, SHA-NI and
//! AES-NI present), which cost the Redis transport a fifth of its throughput
//! (`cargo bench -p prism-transport --bench dist`).

use crate::grpc::Token;
use ring::{aead, hmac, rand::SecureRandom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The key entries of a run are sealed with; clones share the nonce counter.
#[derive(Clone)]
pub struct Seal(Arc<Inner>);

struct Inner {
    key: aead::LessSafeKey,
    /// This process's first nonce, as a number below 2^96.
    start: u128,
    sealed: AtomicU64,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(***)")
    }
}

/// Length of a tag (nonce and Poly1305 tag), in bytes.
pub const TAG_BYTES: usize = aead::NONCE_LEN + 16;

impl Seal {
    /// The seal of the run whose processes hold `token`. The key is derived
    /// from the token (HMAC-SHA-256 of a fixed label), so the bearer token
    /// itself never keys anything else.
    pub fn new(token: &Token) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, token.secret().as_bytes());
        let derived = hmac::sign(&root, b"prism stream entries v1");
        let key = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, derived.as_ref()).expect("a SHA-256 output is a ChaCha20 key");
        let mut start = [0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut start[4..]).expect("the system's random source works");
        Self(Arc::new(Inner { key: aead::LessSafeKey::new(key), start: u128::from_be_bytes(start), sealed: AtomicU64::new(0) }))
    }

    /// The tag of `payload` with id field `id` on `stream`: a fresh nonce,
    /// then the Poly1305 tag.
    pub fn tag(&self, stream: &str, id: &[u8], payload: &[u8]) -> Vec<u8> {
        let n = self.0.sealed.fetch_add(1, Ordering::Relaxed);
        let nonce = (self.0.start.wrapping_add(u128::from(n)) & ((1 << 96) - 1)).to_be_bytes();
        let nonce: [u8; aead::NONCE_LEN] = nonce[4..].try_into().expect("12 bytes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&self.gcm_tag(nonce, stream, id, payload));
        out
    }

    fn gcm_tag(&self, nonce: [u8; aead::NONCE_LEN], stream: &str, id: &[u8], payload: &[u8]) -> [u8; 16] {
        let mut header = header(stream, id);
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(payload), &mut header)
            .expect("a header far below GCM's limit always seals");
        tag.as_ref().try_into().expect("a 16-byte tag")
    }

    /// Whether `tag` is a tag of `payload` with id field `id` on `stream`.
    pub fn verify(&self, stream: &str, id: &[u8], payload: &[u8], tag: &[u8]) -> bool {
        if tag.len() != TAG_BYTES {
            return false;
        }
        let (nonce, gcm) = tag.split_at(aead::NONCE_LEN);
        let nonce: [u8; aead::NONCE_LEN] = nonce.try_into().expect("split at the nonce's length");
        let want = self.gcm_tag(nonce, stream, id, payload);
        // Every byte compared, whatever differs first.
        want.iter().zip(gcm).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Whether an entry whose fields are `id` and `payload`, with the tag field
/// `tag` (`m`, if any), may be read on `stream`: always without a seal; with
/// one, only when the tag is there and right.
pub(super) fn admits(seal: Option<&Seal>, stream: &str, id: &[u8], payload: &[u8], tag: Option<&[u8]>) -> bool {
    match (seal, tag) {
        (None, _) => true,
        (Some(seal), Some(tag)) => seal.verify(stream, id, payload, tag),
        (Some(_), None) => false,
    }
}

/// The stream and the id, each after its length, so that no two pairs share
/// a header.
fn header(stream: &str, id: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + stream.len() + id.len());
    for part in [stream.as_bytes(), id] {
        h.extend_from_slice(&(part.len() as u64).to_be_bytes());
        h.extend_from_slice(part);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_binds_the_token_the_stream_the_id_and_the_payload() {
        let seal = Seal::new(&Token::new("run-token").unwrap());
        let tag = seal.tag("p:r:sampled", b"7", b"payload");
        assert_eq!(tag.len(), TAG_BYTES);
        assert!(seal.verify("p:r:sampled", b"7", b"payload", &tag));
        assert!(!seal.verify("p:r:labeled", b"7", b"payload", &tag), "another stream");
        assert!(!seal.verify("p:r:sampled", b"8", b"payload", &tag), "another id");
        assert!(!seal.verify("p:r:sampled", b"7", b"payloaD", &tag), "another payload");
        assert!(!seal.verify("p:r:sampled", b"7", b"payload", &tag[..TAG_BYTES - 1]), "a short tag");
        assert!(!seal.verify("p:r:sampled", b"7", b"payload", b""), "no tag");
        let mut flipped = tag.clone();
        flipped[0] ^= 1;
        assert!(!seal.verify("p:r:sampled", b"7", b"payload", &flipped), "another nonce");
        // Moving bytes between the id and the payload changes what is sealed.
        assert!(!seal.verify("p:r:sampled", b"7p", b"ayload", &tag));
        assert!(!seal.verify("p:r:sampled7", b"", b"payload", &tag));
        let other = Seal::new(&Token::new("another-token").unwrap());
        assert!(!other.verify("p:r:sampled", b"7", b"payload", &tag), "another token");
        // Another process of the run (its own nonces) checks it.
        let peer = Seal::new(&Token::new("run-token").unwrap());
        assert!(peer.verify("p:r:sampled", b"7", b"payload", &tag));
        // No two tags share a nonce.
        let again = seal.tag("p:r:sampled", b"7", b"payload");
        assert_ne!(again[..aead::NONCE_LEN], tag[..aead::NONCE_LEN]);
        assert_ne!(peer.tag("s", b"1", b"x")[..aead::NONCE_LEN], seal.tag("s", b"1", b"x")[..aead::NONCE_LEN]);
        assert_eq!(format!("{seal:?}"), "Seal(***)");
    }
}
