//! Plain round-robin: each backend in turn, weights ignored.

use std::sync::Arc;

use super::{PickCtx, Selector};
use crate::pool::Backend;

#[derive(Default)]
pub struct RoundRobin {
    next: crate::balance::Cursor,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Selector for RoundRobin {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickCtx<'_>) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.next() % n;
        (0..n).map(|i| (start + i) % n).find(|&i| (ctx.eligible)(i))
    }
}
