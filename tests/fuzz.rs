//! The fuzz targets (src/fuzz.rs) run briefly on stable Rust, as CI does:
//! each target gets its seeds and then inputs mutated from them by a seeded
//! generator (flips, inserts, deletions, splices, random runs), so a run is
//! repeatable. Coverage-guided runs for longer go through cargo fuzz (fuzz/,
//! see README). A target that panics fails this test with the input, in hex.
//!
//! VAULTFS_FUZZ_ITERATIONS sets the inputs per target (default 3000).

mod support;

use std::time::Instant;

use vaultfs::fuzz::{seeds, TARGETS};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// A new input from `pool`: a few random edits of one member, sometimes
/// spliced with another.
fn mutated(pool: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut v = pool[rng.below(pool.len())].clone();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                let b = [0u8, 0xff, b'"', b'{', b'-', b'/', b'=', b':', rng.next() as u8][rng.below(9)];
                v.insert(i, b);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(64));
                v.drain(i..i + n);
            }
            3 => {
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            4 => {
                let i = rng.below(v.len() + 1);
                let run: Vec<u8> = (0..rng.below(32)).map(|_| rng.next() as u8).collect();
                v.splice(i..i, run);
            }
            _ if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

#[test]
fn every_fuzz_target_survives_a_short_run() {
    let iterations: usize =
        std::env::var("VAULTFS_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let mut total = 0;
    for &(name, target) in TARGETS {
        let start = Instant::now();
        let mut pool = seeds(name);
        assert!(!pool.is_empty(), "target {name} has no seeds");
        let mut rng = Rng(0x5eed_0000 + name.len() as u64);
        for i in 0..iterations {
            let input = if i < pool.len() { pool[i].clone() } else { mutated(&pool, &mut rng) };
            let result = std::panic::catch_unwind(|| target(&input));
            if let Err(e) = result {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let shown = &input[..input.len().min(512)];
                panic!(
                    "fuzz target {name} failed on input {i} ({} bytes): {msg}\ninput (hex, first 512 bytes): {}",
                    input.len(),
                    support::hex(shown)
                );
            }
            // Keep some of the mutants as seeds for later ones (bounded pool).
            if pool.len() < 64 && rng.below(8) == 0 {
                pool.push(input);
            }
        }
        total += iterations;
        println!("{name}: {iterations} inputs in {:.1} s", start.elapsed().as_secs_f64());
    }
    support::report(&format!(
        "fuzz targets, smoke run ({} targets, {total} inputs) | {} | 0 | longer runs: cargo fuzz (README)",
        TARGETS.len(),
        TARGETS.len()
    ));
}

/// Writes each target's seeds to fuzz/corpus/TARGET/ for cargo fuzz (run by
/// hand, see README).
#[test]
#[ignore = "writes the seed corpus for cargo fuzz; run by hand"]
fn write_seed_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for &(name, _) in TARGETS {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
        }
    }
    println!("seeds written to {}", root.display());
}
