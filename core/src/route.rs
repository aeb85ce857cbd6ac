//! Routes: `serverType.component.method`, or `component.method` for the receiving server.

use std::fmt;

use thiserror::Error;

/// Why a route string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RouteError {
    /// Not 2 or 3 non-blank parts separated by dots, or has a control character (no
    /// handler has one; written to a log, a newline would start a line of the sender's).
    #[error("invalid route {0:?}: expected component.method or serverType.component.method")]
    Invalid(String),
}

/// A parsed route. Holds the original text and the positions of its dots, so parsing
/// allocates once and the parts are slices of it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Route {
    text: Box<str>,
    /// Index of the first dot.
    first: u16,
    /// Index of the second dot, for three-part routes.
    second: Option<u16>,
}

impl Route {
    /// Parses `text`: exactly 2 or 3 parts, none of them blank, no control characters.
    pub fn parse(text: &str) -> Result<Route, RouteError> {
        let invalid = || RouteError::Invalid(text.to_owned());
        if text.len() > u16::MAX as usize || text.chars().any(char::is_control) {
            return Err(invalid());
        }
        let mut dots = text.match_indices('.').map(|(i, _)| i as u16);
        let first = dots.next().ok_or_else(invalid)?;
        let second = dots.next();
        if dots.next().is_some() {
            return Err(invalid());
        }
        let route = Route { text: text.into(), first, second };
        let parts_ok = route.component().trim() != "" && route.method().trim() != "";
        let type_ok = route.server_type().is_none_or(|t| !t.trim().is_empty());
        if !parts_ok || !type_ok {
            return Err(invalid());
        }
        Ok(route)
    }

    /// The server type, when the route has three parts.
    pub fn server_type(&self) -> Option<&str> {
        self.second.map(|_| &self.text[..self.first as usize])
    }

    /// The component (service) name.
    pub fn component(&self) -> &str {
        match self.second {
            Some(second) => &self.text[self.first as usize + 1..second as usize],
            None => &self.text[..self.first as usize],
        }
    }

    /// The method name.
    pub fn method(&self) -> &str {
        let last_dot = self.second.unwrap_or(self.first) as usize;
        &self.text[last_dot + 1..]
    }

    /// `component.method`, the key handlers are registered under.
    pub fn handler_key(&self) -> &str {
        match self.second {
            Some(_) => &self.text[self.first as usize + 1..],
            None => &self.text,
        }
    }

    /// The route as received.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The full text, without copying it.
    pub fn into_string(self) -> String {
        self.text.into_string()
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Route({:?})", &*self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts() {
        let r = Route::parse("room.room.join").unwrap();
        assert_eq!(
            (r.server_type(), r.component(), r.method(), r.handler_key()),
            (Some("room"), "room", "join", "room.join")
        );
        let r = Route::parse("entry.echo").unwrap();
        assert_eq!(
            (r.server_type(), r.component(), r.method(), r.handler_key()),
            (None, "entry", "echo", "entry.echo")
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in
            ["", "a", ".", "a.", ".b", "a..b", "a.b.c.d", " .a.b", "a. .b", "a.b. ", "a.b\nc", "a.\u{7f}b", "\0a.b"]
        {
            assert!(Route::parse(bad).is_err(), "{bad:?}");
        }
    }
}
