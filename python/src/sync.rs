//! The locks that serialise calls into one pipeline or processor.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, poisoned or not: a panic in a call reaches Python as an exception, and the
/// object stays usable for the calls after it instead of failing each on the poison.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
