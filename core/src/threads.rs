//! Which server a thread belongs to. A server's handle waits for the server to stop, and
//! the stop waits for the server's threads: a wait from one of them would never end, so
//! the handle tells such a call apart and refuses it at once.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

thread_local! {
    /// The server whose thread this is.
    static SERVER_OF_THREAD: RefCell<Weak<()>> = const { RefCell::new(Weak::new()) };
}

/// Marks the threads of one server that run application code (its event loop, workers and
/// remote threads; a cluster layer's listener thread). A thread holds its mark weakly: the
/// mark's allocation outlives every thread marked with it, so no later server is taken
/// for it. Clones mark the same server.
#[derive(Clone, Default)]
pub struct ServerThreads(Arc<()>);

impl ServerThreads {
    /// Marks the current thread as one of this server's.
    pub fn enter(&self) {
        SERVER_OF_THREAD.with(|server| *server.borrow_mut() = Arc::downgrade(&self.0));
    }

    /// Whether the current thread is one of this server's.
    pub fn current(&self) -> bool {
        SERVER_OF_THREAD.with(|server| Weak::ptr_eq(&server.borrow(), &Arc::downgrade(&self.0)))
    }
}

impl std::fmt::Debug for ServerThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerThreads")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_of_the_server_that_marked_it_only() {
        let (a, b) = (ServerThreads::default(), ServerThreads::default());
        assert!(!a.current() && !b.current());
        a.enter();
        assert!(a.current() && a.clone().current() && !b.current());
        let b2 = b.clone();
        std::thread::spawn(move || {
            b2.enter();
            assert!(b2.current());
        })
        .join()
        .unwrap();
        assert!(a.current() && !b.current(), "marks are per thread");
    }
}
