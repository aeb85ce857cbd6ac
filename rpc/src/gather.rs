//! [`Gather`]: where a caller blocked on other servers' answers waits for them. It sleeps at
//! once (a futex) until an answer is put or its deadline passes, where a crossbeam channel's
//! receive first spins and yields the CPU a few times: with dozens of handler workers
//! waiting on user RPCs on a small machine, those yields took CPU the answers needed (user
//! RPCs through one connector: about 1.3 to 2 times as many a second with this;
//! BENCHMARKS.md, "User RPC").

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Answers to `n` calls, each put once (from any thread), taken together by one waiter.
pub(crate) struct Gather<T> {
    /// The answers so far, by call, and how many there are.
    answers: Mutex<(Vec<Option<T>>, usize)>,
    ready: Condvar,
}

impl<T> Gather<T> {
    /// Room for the answers to `n` calls.
    pub(crate) fn new(n: usize) -> Gather<T> {
        Gather { answers: Mutex::new(((0..n).map(|_| None).collect(), 0)), ready: Condvar::new() }
    }

    /// The answer to call `i`; a second answer to it (or to no call) is dropped.
    pub(crate) fn put(&self, i: usize, answer: T) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let (slots, count) = &mut *answers;
        if let Some(slot @ None) = slots.get_mut(i) {
            *slot = Some(answer);
            *count += 1;
            if *count == slots.len() {
                self.ready.notify_one();
            }
        }
    }

    /// Waits until every call is answered or `deadline` passes, and takes the answers
    /// (`None` for calls not answered by then).
    pub(crate) fn wait(&self, deadline: Instant) -> Vec<Option<T>> {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (slots, count) = &mut *answers;
            let left = deadline.saturating_duration_since(Instant::now());
            if *count == slots.len() || left.is_zero() {
                *count = 0;
                return std::mem::take(slots);
            }
            answers = self.ready.wait_timeout(answers, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_waiter_gets_every_answer_or_none_for_those_not_in_by_the_deadline() {
        let gather = Arc::new(Gather::new(3));
        let putter = gather.clone();
        let put = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            putter.put(2, "c");
            putter.put(0, "a");
            putter.put(0, "again");
            putter.put(7, "no such call");
            putter.put(1, "b");
        });
        assert_eq!(gather.wait(Instant::now() + Duration::from_secs(10)), vec![Some("a"), Some("b"), Some("c")]);
        put.join().unwrap();

        let late = Gather::new(2);
        late.put(1, 5);
        let started = Instant::now();
        assert_eq!(late.wait(started + Duration::from_millis(30)), vec![None, Some(5)]);
        assert!(started.elapsed() >= Duration::from_millis(30), "waited for the deadline");
        assert_eq!(Gather::<u8>::new(0).wait(started), Vec::<Option<u8>>::new(), "nothing to wait for");
    }
}
