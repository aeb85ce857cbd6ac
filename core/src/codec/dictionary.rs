//! The route dictionary: route strings the server announces with 2-byte codes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use thiserror::Error;

/// Why a route dictionary was refused at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DictionaryError {
    /// A route is empty after trimming white space.
    #[error("empty route in dictionary")]
    EmptyRoute,
    /// The same route appears twice.
    #[error("route {0:?} appears twice in the dictionary")]
    DuplicateRoute(String),
    /// The same code is given to two routes.
    #[error("code {0} is given to two routes")]
    DuplicateCode(u16),
    /// A route is longer than the 255 bytes a route string can have on the wire.
    #[error("route {0:?} is longer than 255 bytes")]
    RouteTooLong(String),
}

/// Route string <-> code map, fixed at start-up and shared read-only.
#[derive(Debug, Clone, Default)]
pub struct RouteDictionary {
    by_route: HashMap<Arc<str>, u16>,
    by_code: HashMap<u16, Arc<str>>,
}

impl RouteDictionary {
    /// Builds a dictionary from `(route, code)` pairs. Routes are trimmed; duplicates of
    /// either side are refused.
    pub fn new<I, S>(entries: I) -> Result<RouteDictionary, DictionaryError>
    where
        I: IntoIterator<Item = (S, u16)>,
        S: AsRef<str>,
    {
        let mut dict = RouteDictionary::default();
        for (route, code) in entries {
            let route = route.as_ref().trim();
            if route.is_empty() {
                return Err(DictionaryError::EmptyRoute);
            }
            if route.len() > 255 {
                return Err(DictionaryError::RouteTooLong(route.to_owned()));
            }
            let route: Arc<str> = Arc::from(route);
            if dict.by_route.contains_key(&route) {
                return Err(DictionaryError::DuplicateRoute(route.to_string()));
            }
            if dict.by_code.contains_key(&code) {
                return Err(DictionaryError::DuplicateCode(code));
            }
            dict.by_route.insert(route.clone(), code);
            dict.by_code.insert(code, route);
        }
        Ok(dict)
    }

    /// The code of `route`, if it has one.
    pub fn code(&self, route: &str) -> Option<u16> {
        self.by_route.get(route).copied()
    }

    /// The route of `code`, if it is known.
    pub fn route(&self, code: u16) -> Option<&Arc<str>> {
        self.by_code.get(&code)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_code.len()
    }

    /// True when the dictionary has no entries.
    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }

    /// The entries sorted by route, as the handshake sends them.
    pub fn sorted(&self) -> BTreeMap<&str, u16> {
        self.by_route.iter().map(|(r, c)| (&**r, *c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_rejects_duplicates() {
        let d = RouteDictionary::new([(" room.join ", 1u16), ("chat.say", 2)]).unwrap();
        assert_eq!(d.code("room.join"), Some(1));
        assert_eq!(d.route(2).map(|r| &**r), Some("chat.say"));
        assert_eq!(
            RouteDictionary::new([("a", 1u16), ("a ", 2)]).unwrap_err(),
            DictionaryError::DuplicateRoute("a".into())
        );
        assert_eq!(RouteDictionary::new([("a", 1u16), ("b", 1)]).unwrap_err(), DictionaryError::DuplicateCode(1));
        assert_eq!(RouteDictionary::new([("  ", 1u16)]).unwrap_err(), DictionaryError::EmptyRoute);
        assert!(RouteDictionary::new([("x".repeat(256), 1u16)]).is_err());
    }
}
