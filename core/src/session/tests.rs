//! Unit tests of sessions and the session registry.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A sink that records what reaches it, standing in for the runtime.
#[derive(Default)]
struct Recorder {
    pushes: Mutex<Vec<(SessionId, String, Vec<u8>)>>,
    binds: AtomicUsize,
    frontend: bool,
}

impl SessionSink for Recorder {
    fn push(&self, session: &Session, route: &str, body: Vec<u8>) -> Result<(), SessionError> {
        self.pushes.lock().unwrap().push((session.id(), route.to_owned(), body));
        Ok(())
    }
    fn kick(&self, _: &Session, _: &str) -> Result<(), SessionError> {
        Ok(())
    }
    fn bind(&self, _: &Session, _: &str) -> Result<(), SessionError> {
        self.binds.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn push_data(&self, _: &Session) -> Result<(), SessionError> {
        Ok(())
    }
    fn is_frontend(&self) -> bool {
        self.frontend
    }
}

fn session(id: SessionId, sink: Arc<Recorder>) -> Arc<Session> {
    Arc::new(Session::new(SessionInit::new(id, "fe-1"), sink))
}

#[test]
fn bind_once_data_push_and_close() {
    let sink = Arc::new(Recorder { frontend: true, ..Recorder::default() });
    let s = session(7, sink.clone());
    assert!(matches!(s.bind(""), Err(SessionError::EmptyUid)));
    s.bind("alice").unwrap();
    assert!(matches!(s.bind("bob"), Err(SessionError::AlreadyBound(u)) if u == "alice"));
    assert_eq!(sink.binds.load(Ordering::SeqCst), 1);

    s.set("gold", &10).unwrap();
    assert_eq!(s.get::<u32>("gold"), Some(10));
    assert_eq!(s.get::<String>("gold"), None);
    assert_eq!(s.remove("gold"), Some(serde_json::json!(10)));

    s.push("onX", &serde_json::json!({"a": 1})).unwrap();
    assert_eq!(sink.pushes.lock().unwrap()[0], (7, "onX".to_owned(), br#"{"a":1}"#.to_vec()));
    // A push no packet can carry (route, body) fails at once, not silently later.
    let long = "r".repeat(crate::codec::MAX_ROUTE_LEN + 1);
    let refused = s.push(&long, &1).unwrap_err();
    assert_eq!(refused.to_string(), "push: route of 256 bytes is longer than 255 bytes");
    let huge = vec![b'x'; crate::codec::MAX_WIRE_BODY];
    assert!(matches!(s.push_raw("onX", huge), Err(SessionError::Unframable(_))));
    s.push(&long[1..], &1).unwrap();
    assert_eq!(sink.pushes.lock().unwrap().len(), 2);

    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    s.on_close(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    s.close();
    s.close();
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    assert!(matches!(s.push("onX", &1), Err(SessionError::Closed)));
    let c = closed.clone();
    s.on_close(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    assert_eq!(closed.load(Ordering::SeqCst), 2, "late callbacks run at once");
}

#[test]
fn changes_pushed_by_a_backend_leave_other_keys_alone() {
    let s = session(7, Arc::new(Recorder { frontend: true, ..Recorder::default() }));
    s.set("a", &1).unwrap();
    s.set("b", &2).unwrap();
    s.set("c", &3).unwrap();
    let set = [("b".to_owned(), serde_json::json!(20)), ("d".to_owned(), serde_json::json!(4))].into();
    s.change_data(set, &["c".to_owned(), "absent".to_owned()]);
    assert_eq!(serde_json::json!(s.data()), serde_json::json!({"a": 1, "b": 20, "d": 4}));
}

#[test]
fn the_data_as_json_is_encoded_once_and_follows_every_change() {
    let s = session(8, Arc::new(Recorder { frontend: true, ..Recorder::default() }));
    let json = |s: &Session| serde_json::from_slice::<serde_json::Value>(&s.data_json()).unwrap();
    assert_eq!(json(&s), serde_json::json!({}));
    s.set("a", &1).unwrap();
    assert_eq!(json(&s), serde_json::json!({"a": 1}));
    let first = s.data_json();
    assert!(Arc::ptr_eq(&first, &s.data_json()), "encoded again without a change");
    s.get::<i32>("a");
    s.remove("absent");
    assert!(Arc::ptr_eq(&first, &s.data_json()), "reads and removing no key change nothing");
    s.set("b", &"two").unwrap();
    assert_eq!(json(&s), serde_json::json!({"a": 1, "b": "two"}));
    s.remove("a");
    assert_eq!(json(&s), serde_json::json!({"b": "two"}));
    s.change_data([("c".to_owned(), serde_json::json!(3))].into(), &["b".to_owned()]);
    assert_eq!(json(&s), serde_json::json!({"c": 3}));
    s.replace_data([("d".to_owned(), serde_json::json!([4]))].into());
    assert_eq!(json(&s), serde_json::json!({"d": [4]}));
}

#[test]
fn data_shared_at_creation_is_copied_before_a_change() {
    let shared = Arc::new(BTreeMap::from([("a".to_owned(), serde_json::json!(1))]));
    let init = SessionInit { data: Arc::clone(&shared), ..SessionInit::new(9, "fe-1") };
    let s = Session::new(init, Arc::new(Recorder::default()));
    let t = Session::new(
        SessionInit { data: Arc::clone(&shared), ..SessionInit::new(9, "fe-1") },
        Arc::new(Recorder::default()),
    );
    s.set("b", &2).unwrap();
    t.remove("a");
    assert_eq!(serde_json::json!(*shared), serde_json::json!({"a": 1}), "the shared map is left as it was");
    assert_eq!(serde_json::json!(s.data()), serde_json::json!({"a": 1, "b": 2}));
    assert_eq!(serde_json::json!(t.data()), serde_json::json!({}));
}

#[test]
fn on_close_is_frontend_only() {
    let s = session(1, Arc::new(Recorder::default()));
    assert!(matches!(s.on_close(|_| {}), Err(SessionError::FrontendOnly(_))));
}

#[test]
fn registry_indexes_by_id_and_uid() {
    let sink = Arc::new(Recorder { frontend: true, ..Recorder::default() });
    let reg = SessionRegistry::new();
    let (a, b) = (session(1, sink.clone()), session(2, sink));
    reg.insert(a.clone());
    reg.insert(b.clone());
    a.bind("u").unwrap();
    assert!(reg.bind(1, "u", 100).is_empty());
    b.bind("u").unwrap();
    let others = reg.bind(2, "u", 200);
    assert_eq!(others.iter().map(|s| s.id()).collect::<Vec<_>>(), vec![1]);
    assert_eq!((reg.bound_at(1), reg.bound_at(2)), (Some(100), Some(200)));
    assert_eq!(reg.by_uid("u").len(), 2);
    assert_eq!(reg.bound_uids(), 1);
    let (total, page) = reg.search(&SessionFilter { query: Some("2".into()), bound_only: false }, 0, 10);
    assert_eq!((total, page[0].id()), (1, 2));
    let (total, _) = reg.search(&SessionFilter { query: Some("u".into()), bound_only: true }, 0, 10);
    assert_eq!(total, 2);
    reg.remove(1);
    assert_eq!(reg.by_uid("u").len(), 1);
    assert_eq!(reg.bound_at(1), None, "forgotten with the session");
    reg.unbind(2);
    assert_eq!((reg.by_uid("u").len(), reg.bound_at(2)), (0, None));
    reg.remove(2);
    assert_eq!((reg.len(), reg.bound_uids()), (0, 0));
}

/// A panicking on-close callback does not keep the others from running, nor unwind
/// through `close`.
#[test]
fn a_panicking_on_close_callback_does_not_stop_the_others() {
    let s = session(9, Arc::new(Recorder { frontend: true, ..Recorder::default() }));
    let ran = Arc::new(AtomicUsize::new(0));
    s.on_close(|_| panic!("a component's bug")).unwrap();
    let counted = ran.clone();
    s.on_close(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    s.close();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert!(s.is_closed());
}
