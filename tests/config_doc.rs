//! docs/CONFIG.md against the code: every key of every section is documented, no documented
//! key is unknown, and every documented default is the one the server uses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use dragonfruit_core::config::ConfigSource;
use dragonfruit_net::config as net;
use dragonfruit_rpc::{DiscoveryConfig, RpcConfig};
use sample_game::room::GameConfig;
use serde::de::{self, DeserializeOwned, Visitor};

/// A deserializer that only records the field names a derived struct asks for.
struct FieldNames<'a>(&'a mut Vec<&'static str>);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.extend(fields);
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn fields<T: DeserializeOwned>() -> BTreeSet<String> {
    let mut names = Vec::new();
    let _ = T::deserialize(FieldNames(&mut names));
    assert!(!names.is_empty(), "{} is not read as a struct", std::any::type_name::<T>());
    names.into_iter().map(str::to_owned).collect()
}

/// The key tables of CONFIG.md: section → key → default cell, as written.
fn documented() -> BTreeMap<String, BTreeMap<String, String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONFIG.md");
    let text = std::fs::read_to_string(path).expect("docs/CONFIG.md");
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        let (section, name) = key.split_once('.').unwrap_or_else(|| panic!("key without section: {line}"));
        let default = cells.get(1).unwrap_or_else(|| panic!("row without default: {line}")).trim();
        let known = sections.entry(section.to_owned()).or_default();
        assert!(known.insert(name.to_owned(), default.to_owned()).is_none(), "{key} documented twice");
    }
    sections
}

/// Checks one section: its keys against the struct's fields, and its documented defaults
/// (those written as a TOML value) read back as the struct's default.
fn check_section<T: DeserializeOwned + Default + Debug>(
    docs: &mut BTreeMap<String, BTreeMap<String, String>>,
    section: &str,
) {
    let keys = docs.remove(section).unwrap_or_default();
    let documented: BTreeSet<String> = keys.keys().cloned().collect();
    let fields = fields::<T>();
    let undocumented: Vec<&String> = fields.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&fields).collect();
    assert!(undocumented.is_empty(), "[{section}] keys missing from docs/CONFIG.md: {undocumented:?}");
    assert!(unknown.is_empty(), "docs/CONFIG.md documents [{section}] keys the server does not read: {unknown:?}");

    let mut text = format!("[{section}]\n");
    for (key, default) in &keys {
        // `"30s"`, `25`, `{}`: a TOML value; "none" or `<temp dir>/...`: described, not a value.
        let Some(value) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')) else { continue };
        if value.starts_with('<') {
            continue;
        }
        text.push_str(&format!("{key} = {value}\n"));
    }
    let source =
        ConfigSource::from_toml(&text).unwrap_or_else(|e| panic!("documented defaults of [{section}]: {e}\n{text}"));
    let read: T = source.section(section).unwrap_or_else(|e| panic!("documented defaults of [{section}]: {e}\n{text}"));
    assert_eq!(
        format!("{read:?}"),
        format!("{:?}", T::default()),
        "documented defaults of [{section}] differ:\n{text}"
    );
}

#[test]
fn every_configuration_key_is_documented_with_its_default() {
    let mut docs = documented();
    check_section::<net::ServerConfig>(&mut docs, "server");
    check_section::<net::AcceptorConfig>(&mut docs, "acceptor");
    check_section::<net::HeartbeatConfig>(&mut docs, "heartbeat");
    check_section::<net::HandshakeConfig>(&mut docs, "handshake");
    check_section::<net::PacketConfig>(&mut docs, "packet");
    check_section::<net::MessageConfig>(&mut docs, "message");
    check_section::<net::ConnectionConfig>(&mut docs, "connection");
    check_section::<net::DispatchConfig>(&mut docs, "dispatch");
    check_section::<net::SessionConfig>(&mut docs, "session");
    check_section::<net::ShutdownConfig>(&mut docs, "shutdown");
    check_section::<RpcConfig>(&mut docs, "rpc");
    check_section::<DiscoveryConfig>(&mut docs, "discovery");
    check_section::<GameConfig>(&mut docs, "game");
    assert!(docs.is_empty(), "docs/CONFIG.md documents sections no server reads: {:?}", docs.keys());
}
