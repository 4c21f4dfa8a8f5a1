//! The fuzz target's no-panic property on the stable toolchain: every fixture and fuzz seed, and a few
//! thousand deterministic mutations of them, go through decode, normalize and references without panicking,
//! and whatever normalizes is a fixed point that survives a JSON round trip.

use std::path::Path;

use crate::{files, fixtures_dir};

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that change the meaning of YAML and JSON.
const INTERESTING: &[u8] = b"{}[]:,-\"'\n #&*!|>?%@`\\\t0.9e=~";

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = out.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => out.truncate(rng.below(len + 1)),
            3 if len > 0 => {
                let start = rng.below(len);
                let end = (start + rng.below(64)).min(len);
                out.drain(start..end);
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + rng.below(64)).min(len);
                let chunk = out[start..end].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, chunk);
            }
            _ => {
                let at = rng.below(len + 1);
                out.insert(at, INTERESTING[rng.below(INTERESTING.len())]);
            }
        }
    }
    out
}

/// What the fuzz target checks, for one input; returns how many resources normalized.
fn check(text: &str) -> usize {
    let Ok(resources) = model::decode_manifests(text) else {
        return 0;
    };
    let mut ok = 0;
    for r in resources {
        let _ = model::references(&r);
        let Ok(normalized) = model::normalize(r) else {
            continue;
        };
        ok += 1;
        let again =
            model::normalize(normalized.clone()).expect("a normalized resource stays valid");
        assert_eq!(
            again, normalized,
            "normalize is not idempotent for {text:?}"
        );
        let json = serde_json::to_string(&normalized).expect("resources serialize");
        let back = model::decode_manifests(&json).expect("a normalized resource decodes");
        assert_eq!(
            back,
            vec![normalized],
            "JSON round trip changed a resource from {text:?}"
        );
    }
    ok
}

fn inputs() -> Vec<Vec<u8>> {
    let fuzz_seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/manifest");
    let dirs = [
        crate::seeds_dir(),
        fixtures_dir().join("valid"),
        fixtures_dir().join("invalid"),
        fuzz_seeds,
    ];
    dirs.iter()
        .flat_map(|d| files(d, &["yaml", "json"]))
        .map(|p| std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
        .collect()
}

#[test]
fn seeds_and_mutations_never_panic() {
    let seeds = inputs();
    let mut accepted = 0;
    for s in &seeds {
        accepted += check(&String::from_utf8_lossy(s));
    }
    assert!(
        accepted > 10,
        "the seeds should mostly be valid, only {accepted} normalized"
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..4000 {
        let pick = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[pick]);
        check(&String::from_utf8_lossy(&input));
    }
}

#[test]
fn deep_nesting_is_refused_quickly() {
    for text in [
        "[".repeat(100_000),
        "{\"a\":".repeat(100_000),
        "- ".repeat(50_000),
        "a: [".repeat(50_000),
    ] {
        let started = std::time::Instant::now();
        let err = model::decode_manifests(&text)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("recursion limit exceeded")
                || err.contains("nesting is deeper than 128 levels"),
            "{err}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?} took {:?}",
            &text[..4],
            started.elapsed()
        );
    }
}
