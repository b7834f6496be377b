//! Chained block hashes: a block's name is the hash of its parent's name and its own token ids,
//! so equal names mean equal prefixes, not just equal blocks.

use xxhash_rust::xxh3::xxh3_64;

/// Name of one full KV block, derived from every token before and inside it.
pub type BlockHash = u64;

/// Parent hash of the first block of every sequence.
pub const ROOT_HASH: BlockHash = 0x7461_6e64_656d_0001;

/// Hash of a block given its parent's hash and the block's token ids.
pub fn chain_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    let mut bytes = Vec::with_capacity(8 + tokens.len() * 4);
    bytes.extend_from_slice(&parent.to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Hashes of every *full* block of `tokens`; a trailing partial block has no name yet.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    assert!(block_size > 0, "block size must be positive");
    let mut parent = ROOT_HASH;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            parent = chain_hash(parent, chunk);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_blocks_are_named() {
        let tokens: Vec<u32> = (0..37).collect();
        assert_eq!(block_hashes(&tokens, 16).len(), 2);
        assert!(block_hashes(&tokens[..15], 16).is_empty());
    }

    #[test]
    fn hash_depends_on_the_whole_prefix() {
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[0] = 999;
        let (ha, hb) = (block_hashes(&a, 16), block_hashes(&b, 16));
        // The second blocks hold identical tokens but different prefixes.
        assert_eq!(a[16..], b[16..]);
        assert_ne!(ha[1], hb[1]);
        // Same prefix, same names.
        assert_eq!(ha, block_hashes(&a, 16));
    }
}
