//! Synapse's signing key file (`signing_key_path`): lines of
//! `ed25519 <version> <unpadded base64 seed>`. Read here because the
//! config needs it too (Synapse derives its macaroon secret from it).

use base64::Engine;

/// The first key of a Synapse signing-key file (`ed25519 <version> <unpadded
/// base64 seed>` per line; blank lines skipped): its version and seed.
pub fn first_key(text: &str) -> anyhow::Result<(String, [u8; 32])> {
    let line = text.lines().find(|l| !l.trim().is_empty()).ok_or_else(|| anyhow::anyhow!("no key in the file"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [alg, version, seed_b64] = fields.as_slice() else {
        anyhow::bail!("expected `ed25519 <version> <seed>`");
    };
    anyhow::ensure!(*alg == "ed25519", "unsupported key algorithm {alg}");
    let seed = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(seed_b64.trim_end_matches('='))
        .map_err(|e| anyhow::anyhow!("seed is not base64: {e}"))?;
    let seed: [u8; 32] = seed.try_into().map_err(|_| anyhow::anyhow!("seed must be 32 bytes"))?;
    Ok(((*version).to_owned(), seed))
}
