//! Telling zero bytes from data, for sparse conversion and compare.

/// Whether every byte of `buf` is zero. OR-folds 128-byte blocks, which the
/// compiler turns into wide vector loads, and stops at the first non-zero block.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(128);
    blocks.by_ref().all(|b| b.iter().fold(0u8, |a, &x| a | x) == 0) && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_zero_words_and_bytes() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for at in [0, 1, 15, 16, 2048, 4098] {
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
            b[at] = 0;
        }
        assert!(is_zero(&[]));
    }
}
