//! Reading a `/keys/query` body in one pass, without building a
//! `serde_json::Value` tree: only `device_keys` and `timeout` are kept,
//! everything else is read through (it must still be valid JSON, nested no
//! deeper than `serde_json` allows) and dropped. [`super::request`] gives
//! the shape its meaning.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What a body is, as far as `/keys/query` cares. Of duplicate keys the
/// last wins, as in the dict Synapse's JSON parser builds.
#[derive(Debug, Default)]
pub struct Body {
    /// Whether the body is a JSON object at all.
    pub object: bool,
    /// `device_keys`: its entries in the order sent (duplicates kept) with
    /// each value's strings, `None` for a value that is not a list of
    /// strings; `None` when it is not an object or absent.
    pub device_keys: Option<Vec<(String, Option<Vec<String>>)>>,
    /// `timeout`, when it is a non-negative integer.
    pub timeout: Option<u64>,
}

impl Body {
    pub fn read(text: &str) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let Shaped(body) = Shaped::<Body>::deserialize(&mut de)?;
        de.end()?;
        Ok(body)
    }
}

/// A value read by kind: each shape keeps the kinds it wants and reads the
/// others through. Every kind goes through `deserialize_any`, so nesting is
/// limited exactly as for `serde_json::Value`.
trait Shape: Sized {
    fn other() -> Self;
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value::<Shaped<Ignored>>()?;
        }
        Ok(Self::other())
    }
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<Shaped<Ignored>>()?.is_some() {}
        Ok(Self::other())
    }
    fn string(_: &str) -> Self {
        Self::other()
    }
    fn u64(_: u64) -> Self {
        Self::other()
    }
}

struct Shaped<T>(T);

impl<'de, T: Shape> Deserialize<'de> for Shaped<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor(PhantomData)).map(Shaped)
    }
}

struct ShapeVisitor<T>(PhantomData<T>);

impl<'de, T: Shape> Visitor<'de> for ShapeVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::seq(seq)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok(T::string(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok(T::u64(v))
    }
    // `serde_json::Value` stores a non-negative i64 as a u64.
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Ok(u64::try_from(v).map_or_else(|_| T::other(), T::u64))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::other())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::other())
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::other())
    }
}

struct Ignored;

impl Shape for Ignored {
    fn other() -> Self {
        Ignored
    }
}

impl Shape for Body {
    fn other() -> Self {
        Body::default()
    }
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut body = Body { object: true, ..Body::default() };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "device_keys" => body.device_keys = map.next_value::<Shaped<DeviceKeys>>()?.0.0,
                "timeout" => body.timeout = map.next_value::<Shaped<Timeout>>()?.0.0,
                _ => {
                    map.next_value::<Shaped<Ignored>>()?;
                }
            }
        }
        Ok(body)
    }
}

struct DeviceKeys(Option<Vec<(String, Option<Vec<String>>)>>);

impl Shape for DeviceKeys {
    fn other() -> Self {
        DeviceKeys(None)
    }
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(user) = map.next_key::<String>()? {
            entries.push((user, map.next_value::<Shaped<StringList>>()?.0.0));
        }
        Ok(DeviceKeys(Some(entries)))
    }
}

/// A list of strings, or `None` (anything else, or a list holding anything
/// else).
struct StringList(Option<Vec<String>>);

impl Shape for StringList {
    fn other() -> Self {
        StringList(None)
    }
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut items = Some(Vec::new());
        while let Some(Shaped(Item(item))) = seq.next_element::<Shaped<Item>>()? {
            match (&mut items, item) {
                (Some(list), Some(s)) => list.push(s),
                _ => items = None,
            }
        }
        Ok(StringList(items))
    }
}

struct Item(Option<String>);

impl Shape for Item {
    fn other() -> Self {
        Item(None)
    }
    fn string(s: &str) -> Self {
        Item(Some(s.to_owned()))
    }
}

struct Timeout(Option<u64>);

impl Shape for Timeout {
    fn other() -> Self {
        Timeout(None)
    }
    fn u64(v: u64) -> Self {
        Timeout(Some(v))
    }
}
