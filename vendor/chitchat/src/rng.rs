//! grid patch: where chitchat's randomness comes from. By default the thread's RNG, as in
//! the published crate; a deterministic simulator seeds it for the calling thread with
//! [`seed_thread_rng`], so that gossip peer selection and delta shuffles replay from a seed.

use std::cell::RefCell;

use rand::SeedableRng;
use rand::rngs::StdRng;

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes every chitchat RNG created on this thread from now on derive from `seed`
/// (`None`: back to the OS-seeded thread RNG). For deterministic simulation.
pub fn seed_thread_rng(seed: Option<u64>) {
    SEEDED.with(|s| *s.borrow_mut() = seed.map(StdRng::seed_from_u64));
}

/// A new generator: from the thread's seeded stream if there is one, else from the OS.
pub(crate) fn new_rng() -> StdRng {
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(seeded) => StdRng::from_rng(seeded),
        None => StdRng::from_rng(&mut rand::rng()),
    })
}
