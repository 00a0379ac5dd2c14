//! The stable-toolchain stand-in for libFuzzer (`cargo test --release` in
//! rust/fuzz): every target function runs on its seed corpus (corpus/<target>/,
//! made by seed.py), on the committed regression inputs
//! (tests/fuzz-regressions/<target>/ at the repository root), and on cheap
//! random mutations of each seed. Each input must finish without a panic,
//! within the harness's heap budget, and within QBLOCK_FUZZ_TIMEOUT_MS
//! (default 1000; meaningful in --release builds only).
//!
//! QBLOCK_FUZZ_MUTATIONS sets the mutations per seed (default 50) and
//! QBLOCK_FUZZ_TARGETS a space-separated subset of targets.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// xorshift64*: a deterministic, dependency-free source of mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A few libFuzzer-like edits: bit flips, interesting integers at (mostly
/// early, header) offsets, copied spans, truncation.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    if v.is_empty() {
        v.push(0);
    }
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        // Headers live early: three edits in four hit the first 4 KiB.
        let at = if rng.below(4) > 0 { rng.below(len.min(4096)) } else { rng.below(len) };
        match rng.below(6) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = rng.next() as u8,
            2 => {
                const VALUES: [u64; 8] = [0, 1, 0x7f, 0xff, 0x8000_0000, 0xffff_ffff, 1 << 40, u64::MAX];
                let x = VALUES[rng.below(VALUES.len())].to_le_bytes();
                let (bytes, n) = if rng.below(2) == 0 { (x, 4) } else { (x, 8) };
                let mut b = bytes[..n].to_vec();
                if rng.below(2) == 0 {
                    b.reverse(); // big-endian fields are as common
                }
                let end = (at + n).min(len);
                v[at..end].copy_from_slice(&b[..end - at]);
            }
            3 => {
                let from = rng.below(len);
                let n = rng.below(64).min(len - from).min(len - at);
                v.copy_within(from..from + n, at);
            }
            4 => v.truncate(at.max(1)),
            _ => v[at] = v[at].wrapping_add(rng.below(16) as u8).wrapping_sub(8),
        }
    }
    v
}

fn check_one(target: &str, what: &str, data: &[u8], limit: Duration) -> Option<String> {
    let t = Instant::now();
    let r = std::panic::catch_unwind(|| qblock_fuzz::run_target(target, data));
    let took = t.elapsed();
    match r {
        Err(_) => Some(format!("{target}: {what}: panicked")),
        Ok(()) if took > limit => Some(format!("{target}: {what}: took {took:?}")),
        Ok(()) => None,
    }
}

#[test]
fn replay_seeds_and_mutations() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regressions = here.join("../../tests/fuzz-regressions");
    let limit = Duration::from_millis(env_num("QBLOCK_FUZZ_TIMEOUT_MS", 1000));
    let mutations = env_num("QBLOCK_FUZZ_MUTATIONS", 50);
    let only = std::env::var("QBLOCK_FUZZ_TARGETS").ok();
    let mut failures = Vec::new();
    let mut runs = 0u64;
    for (target, _) in qblock_fuzz::TARGETS {
        if only.as_ref().is_some_and(|o| !o.split_whitespace().any(|t| t == *target)) {
            continue;
        }
        for path in files(&regressions.join(target)) {
            let data = std::fs::read(&path).unwrap();
            failures.extend(check_one(target, &path.display().to_string(), &data, limit));
            runs += 1;
        }
        for (i, path) in files(&here.join("corpus").join(target)).iter().enumerate() {
            let seed = std::fs::read(path).unwrap();
            failures.extend(check_one(target, &path.display().to_string(), &seed, limit));
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) << 32) ^ seed.len() as u64);
            for m in 0..mutations {
                let data = mutate(&seed, &mut rng);
                let what = format!("{} mutation {m}", path.display());
                if let Some(f) = check_one(target, &what, &data, limit) {
                    // Keep the input so it can be minimised and committed.
                    let out = here.join("artifacts").join(target);
                    let _ = std::fs::create_dir_all(&out);
                    let _ = std::fs::write(out.join(format!("replay-{i}-{m}.bin")), &data);
                    failures.push(f);
                }
                runs += 1;
            }
        }
    }
    eprintln!("replay: {runs} inputs, {} failures", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
