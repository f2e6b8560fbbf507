//! The daemon's one policy for poisoned mutexes.
//!
//! Every std mutex in the daemon guards plain data (maps, caches) that is
//! never left half-written by a panic, and none is held across an await.
//! A panic in one operation must not take every later call down with it,
//! so a poisoned lock is recovered, not propagated.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub trait Locked<T> {
    /// Locks, recovering from poisoning.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.locked();
            panic!("poison it");
        })
        .join();
        assert!(m.lock().is_err());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
    }
}
