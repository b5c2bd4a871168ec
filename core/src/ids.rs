//! Unpredictable ids and tokens (stream ids, session ids, stream keys, API tokens).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

/// 128 random bits as 32 lowercase hex digits. Each `RandomState` is keyed from the operating
/// system's random source (once per process, then advanced per instance), and the hash also
/// takes the clock, so ids are unpredictable without a random-number dependency.
pub fn random_hex() -> String {
    let word = || {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        h.finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_and_distinct() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| random_hex()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(
            ids.iter()
                .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }
}
