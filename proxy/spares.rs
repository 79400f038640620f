//! Per-thread stacks of spare objects: what a finished message leaves (an answer's write
//! buffer, a connection's read buffer, a header map) is taken by the next message on the
//! same worker instead of going back to the allocator and being made again. Each owner
//! decides what is worth keeping and how many; a stack never holds more than that.

use std::cell::RefCell;
use std::thread::LocalKey;

/// One kind of spare, kept per thread (`thread_local!` with `const { RefCell::new(Vec::new()) }`).
pub type Stack<T> = RefCell<Vec<T>>;

/// The spare kept last on this thread's `stack`, if any.
#[inline]
pub fn take<T: 'static>(stack: &'static LocalKey<Stack<T>>) -> Option<T> {
    stack.with(|s| s.borrow_mut().pop())
}

/// Keeps `spare` on this thread's `stack` unless it already holds `most`.
#[inline]
pub fn keep<T: 'static>(stack: &'static LocalKey<Stack<T>>, spare: T, most: usize) {
    stack.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < most {
            s.push(spare);
        }
    });
}

/// How many spares this thread's `stack` holds.
#[cfg(test)]
pub fn count<T: 'static>(stack: &'static LocalKey<Stack<T>>) -> usize {
    stack.with(|s| s.borrow().len())
}

/// Empties this thread's `stack`: a test's start, whatever an earlier test on the thread left.
#[cfg(test)]
pub fn clear<T: 'static>(stack: &'static LocalKey<Stack<T>>) {
    stack.with(|s| s.borrow_mut().clear());
}
