//! Seeded randomness for the randomized unit tests, so that a failure can
//! be replayed: each takes its generator from [`rng`]. The seed is
//! `PULSO_TEST_SEED` when set (decimal, or hex with `0x`), else
//! [`DEFAULT_SEED`], so every run of `cargo test` tries the same inputs;
//! a failing test prints its seed and the command that replays it.

use std::ops::{Deref, DerefMut};

use rand::SeedableRng;
use rand::rngs::StdRng;

/// The seed when `PULSO_TEST_SEED` is not set.
pub(crate) const DEFAULT_SEED: u64 = 0x7075_6c73_6f00_0001;

/// A test's generator; says its seed if the test panics.
pub(crate) struct Seeded {
    rng: StdRng,
    seed: u64,
    test: &'static str,
}

/// The generator for the test named `test` (its function name, for the
/// replay command).
pub(crate) fn rng(test: &'static str) -> Seeded {
    let seed = match std::env::var("PULSO_TEST_SEED") {
        Err(_) => DEFAULT_SEED,
        Ok(text) => parse(&text).unwrap_or_else(|| {
            panic!("PULSO_TEST_SEED={text:?} is not a number such as 42 or 0x2a")
        }),
    };
    Seeded {
        rng: StdRng::seed_from_u64(seed),
        seed,
        test,
    }
}

fn parse(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

impl Deref for Seeded {
    type Target = StdRng;
    fn deref(&self) -> &StdRng {
        &self.rng
    }
}

impl DerefMut for Seeded {
    fn deref_mut(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

impl Drop for Seeded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {:#x}; replay: PULSO_TEST_SEED={:#x} cargo test --lib {}",
                self.test, self.seed, self.seed, self.test
            );
        }
    }
}

#[test]
fn a_seed_gives_the_same_numbers_and_parses_in_both_spellings() {
    use rand::Rng;
    let a: Vec<u32> = (0..8).map(|_| StdRng::seed_from_u64(7).random()).collect();
    let b: Vec<u32> = (0..8).map(|_| StdRng::seed_from_u64(7).random()).collect();
    assert_eq!(a, b);
    assert_eq!(parse("42"), Some(42));
    assert_eq!(parse(" 0x2a "), Some(42));
    assert_eq!(parse("0xzz"), None);
    assert_eq!(parse("-1"), None);
}
