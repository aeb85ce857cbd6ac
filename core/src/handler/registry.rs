//! `HandlerRegistry`: handlers by server type and `component.method`, built before start
//! and read-only afterwards.

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use crate::handler::{Component, Handler, HandlerKind, RemoteFn, Routes};

/// Why a component could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A name is empty or contains a dot, white space or a control character (no route
    /// could reach it).
    #[error("invalid {what} name {name:?}")]
    InvalidName {
        /// "server type", "component" or "method".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The same route is registered twice.
    #[error("route {0} is registered twice")]
    Duplicate(String),
}

/// One registered route, for listings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteInfo {
    /// `serverType.component.method`.
    pub route: String,
    /// Request or notify.
    pub kind: HandlerKind,
}

impl PartialOrd for HandlerKind {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HandlerKind {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}

/// A component registered on the server, for lifecycle hooks.
#[derive(Clone)]
pub struct RegisteredComponent {
    /// Server type it serves.
    pub server_type: String,
    /// Component name.
    pub name: String,
    /// The component.
    pub component: Arc<dyn Component>,
}

/// Handlers of every server type served by this process.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    by_type: HashMap<String, HashMap<String, Handler>>,
    /// Remotes (user RPC handlers) by server type and `component.method`; clients cannot
    /// reach these.
    remotes: HashMap<String, HashMap<String, Arc<RemoteFn>>>,
    components: Vec<RegisteredComponent>,
}

fn check_name(what: &'static str, name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.contains('.') || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(RegistryError::InvalidName { what, name: name.to_owned() });
    }
    Ok(())
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> HandlerRegistry {
        HandlerRegistry::default()
    }

    /// Registers `component` as `name` for server type `server_type`.
    pub fn register<C: Component>(&mut self, server_type: &str, name: &str, component: C) -> Result<(), RegistryError> {
        self.register_arc(server_type, name, Arc::new(component))
    }

    /// Registers a shared component.
    pub fn register_arc<C: Component>(
        &mut self,
        server_type: &str,
        name: &str,
        component: Arc<C>,
    ) -> Result<(), RegistryError> {
        check_name("server type", server_type)?;
        check_name("component", name)?;
        let mut routes = Routes::new(component.clone());
        C::routes(&mut routes);
        for method in routes.methods.iter().map(|(m, _)| m).chain(routes.remotes.iter().map(|(m, _)| m)) {
            check_name("method", method)?;
        }
        let table = self.by_type.entry(server_type.to_owned()).or_default();
        for (method, handler) in routes.methods {
            let key = format!("{name}.{method}");
            if table.insert(key.clone(), handler).is_some() {
                return Err(RegistryError::Duplicate(format!("{server_type}.{key}")));
            }
        }
        let remotes = self.remotes.entry(server_type.to_owned()).or_default();
        for (method, remote) in routes.remotes {
            let key = format!("{name}.{method}");
            if remotes.insert(key.clone(), remote).is_some() {
                return Err(RegistryError::Duplicate(format!("remote {server_type}.{key}")));
            }
        }
        self.components.push(RegisteredComponent {
            server_type: server_type.to_owned(),
            name: name.to_owned(),
            component,
        });
        Ok(())
    }

    /// The handler of `component.method` on `server_type`.
    pub fn lookup(&self, server_type: &str, handler_key: &str) -> Option<&Handler> {
        self.by_type.get(server_type)?.get(handler_key)
    }

    /// The remote `component.method` on `server_type`.
    pub fn lookup_remote(&self, server_type: &str, key: &str) -> Option<&Arc<RemoteFn>> {
        self.remotes.get(server_type)?.get(key)
    }

    /// Whether this process has handlers or remotes for `server_type`.
    pub fn serves(&self, server_type: &str) -> bool {
        self.by_type.contains_key(server_type) || self.remotes.contains_key(server_type)
    }

    /// All remotes as `serverType.component.method`, sorted.
    pub fn remote_routes(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.remotes.iter().flat_map(|(t, table)| table.keys().map(move |k| format!("{t}.{k}"))).collect();
        out.sort();
        out
    }

    /// All routes, sorted.
    pub fn routes(&self) -> Vec<RouteInfo> {
        let mut out: Vec<RouteInfo> = self
            .by_type
            .iter()
            .flat_map(|(t, table)| {
                table.iter().map(move |(k, h)| RouteInfo { route: format!("{t}.{k}"), kind: h.kind })
            })
            .collect();
        out.sort();
        out
    }

    /// Every `(server type, component.method, handler)`.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, &Handler)> {
        self.by_type.iter().flat_map(|(t, table)| table.iter().map(move |(k, h)| (t.as_str(), k.as_str(), h)))
    }

    /// Registered components in registration order.
    pub fn components(&self) -> &[RegisteredComponent] {
        &self.components
    }
}
