//! Before and after pipelines: ordered functions around every handler call.

use std::sync::Arc;

use crate::error::HandlerError;
use crate::handler::Ctx;

/// Runs before the handler: may inspect and change the context and the raw body, or fail
/// the request (the handler then does not run).
pub type BeforeFn = dyn Fn(&mut Ctx<'_>, &mut Vec<u8>) -> Result<(), HandlerError> + Send + Sync;
/// Runs after the handler: may inspect and change the serialized response or the error.
pub type AfterFn = dyn Fn(&mut Ctx<'_>, &mut Result<Vec<u8>, HandlerError>) + Send + Sync;

/// The ordered before and after chains of a server.
#[derive(Clone, Default)]
pub struct Pipelines {
    before: Vec<Arc<BeforeFn>>,
    after: Vec<Arc<AfterFn>>,
}

impl Pipelines {
    /// Appends a before-handler function.
    pub fn before(
        &mut self,
        f: impl Fn(&mut Ctx<'_>, &mut Vec<u8>) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) {
        self.before.push(Arc::new(f));
    }

    /// Appends an after-handler function.
    pub fn after(&mut self, f: impl Fn(&mut Ctx<'_>, &mut Result<Vec<u8>, HandlerError>) + Send + Sync + 'static) {
        self.after.push(Arc::new(f));
    }

    pub(crate) fn has_before(&self) -> bool {
        !self.before.is_empty()
    }

    pub(crate) fn run_before(&self, ctx: &mut Ctx<'_>, body: &mut Vec<u8>) -> Result<(), HandlerError> {
        self.before.iter().try_for_each(|f| f(ctx, body))
    }

    pub(crate) fn run_after(&self, ctx: &mut Ctx<'_>, result: &mut Result<Vec<u8>, HandlerError>) {
        for f in &self.after {
            f(ctx, result);
        }
    }
}
