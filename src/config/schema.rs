//! The shape of `config.toml`, read off the raw structs themselves: a deserializer that answers
//! every request with a placeholder and records what was asked for (a string, a number, a
//! list, a table and its fields). The environment mapping and `stowage config` walk this tree,
//! so a key added to a raw struct is settable by `STOWAGE_*` and shown without further code.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;

use super::raw::RawConfig;

/// What a key holds.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Kind {
    Str,
    Int,
    Float,
    Bool,
    /// A list; its elements' kind.
    List(Box<Kind>),
    /// A table and its keys, in declaration order.
    Table(Vec<Field>),
    /// Anything else (an enum, a map): taken as a TOML value, else as a string.
    Any,
}

/// One key of a table.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Field {
    pub(super) name: &'static str,
    pub(super) kind: Kind,
    /// `Option<_>` in the raw struct: absent means "the default" (or, for a table, "off").
    pub(super) optional: bool,
}

/// The keys of the whole file (the top-level table).
pub(super) fn schema() -> Result<Vec<Field>, String> {
    let shape = RefCell::new(Shape::default());
    RawConfig::deserialize(Tracer { shape: &shape }).map_err(|e| e.0)?;
    match shape.into_inner().kind {
        Some(Kind::Table(fields)) => Ok(fields),
        other => Err(format!("the raw configuration is not a table: {other:?}")),
    }
}

/// What one traced value turned out to be.
#[derive(Default)]
struct Shape {
    kind: Option<Kind>,
    optional: bool,
}

#[derive(Debug)]
struct TraceError(String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        TraceError(msg.to_string())
    }
}

/// Deserializes one value, recording its kind in `shape`.
struct Tracer<'s> {
    shape: &'s RefCell<Shape>,
}

impl Tracer<'_> {
    fn set(&self, kind: Kind) {
        self.shape.borrow_mut().kind = Some(kind);
    }
}

macro_rules! trace_as {
    ($kind:expr, $visit:ident($value:expr): $($method:ident)*) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
            self.set($kind);
            v.$visit($value)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = TraceError;

    trace_as!(Kind::Str, visit_str(""): deserialize_str deserialize_string deserialize_char
        deserialize_identifier);
    trace_as!(Kind::Int, visit_i64(0): deserialize_i8 deserialize_i16 deserialize_i32
        deserialize_i64 deserialize_i128);
    trace_as!(Kind::Int, visit_u64(0): deserialize_u8 deserialize_u16 deserialize_u32
        deserialize_u64 deserialize_u128);
    trace_as!(Kind::Float, visit_f64(0.0): deserialize_f32 deserialize_f64);
    trace_as!(Kind::Bool, visit_bool(false): deserialize_bool);
    trace_as!(Kind::Any, visit_str(""): deserialize_any deserialize_bytes deserialize_byte_buf
        deserialize_ignored_any);

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
        self.set(Kind::Any);
        v.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
        self.shape.borrow_mut().optional = true;
        v.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, TraceError> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, TraceError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
        let element = RefCell::new(Shape::default());
        let value = v.visit_seq(OneElement {
            shape: &element,
            done: false,
        })?;
        let inner = element.into_inner().kind.unwrap_or(Kind::Any);
        self.set(Kind::List(Box::new(inner)));
        Ok(value)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, TraceError> {
        self.set(Kind::Any);
        v.visit_seq(OneElement {
            shape: &RefCell::new(Shape::default()),
            done: true,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, TraceError> {
        self.deserialize_tuple(len, v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
        self.set(Kind::Any);
        v.visit_map(&mut Fields {
            names: &[],
            next: 0,
            fields: Vec::new(),
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        names: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, TraceError> {
        let mut access = Fields {
            names,
            next: 0,
            fields: Vec::new(),
        };
        let value = v.visit_map(&mut access)?;
        self.set(Kind::Table(access.fields));
        Ok(value)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, TraceError> {
        self.set(Kind::Any);
        let first = variants.first().copied().unwrap_or_default();
        v.visit_enum(de::value::StrDeserializer::<TraceError>::new(first))
    }
}

/// A list of one traced element.
struct OneElement<'s> {
    shape: &'s RefCell<Shape>,
    done: bool,
}

impl<'de> de::SeqAccess<'de> for OneElement<'_> {
    type Error = TraceError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, TraceError> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        seed.deserialize(Tracer { shape: self.shape }).map(Some)
    }
}

/// A struct's fields, each traced as its value is asked for.
struct Fields {
    names: &'static [&'static str],
    next: usize,
    fields: Vec<Field>,
}

impl<'de> de::MapAccess<'de> for &mut Fields {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        match self.names.get(self.next) {
            None => Ok(None),
            Some(name) => seed.deserialize(name.into_deserializer()).map(Some),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, TraceError> {
        let Some(name) = self.names.get(self.next) else {
            return Err(TraceError("a value without a key".into()));
        };
        self.next += 1;
        let shape = RefCell::new(Shape::default());
        let value = seed.deserialize(Tracer { shape: &shape })?;
        let shape = shape.into_inner();
        self.fields.push(Field {
            name,
            kind: shape.kind.unwrap_or(Kind::Any),
            optional: shape.optional,
        });
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field<'a>(fields: &'a [Field], path: &str) -> &'a Field {
        let mut fields = fields;
        let mut found = None;
        for part in path.split('.') {
            let f = fields
                .iter()
                .find(|f| f.name == part)
                .unwrap_or_else(|| panic!("no {path}"));
            fields = match &f.kind {
                Kind::Table(t) => t,
                Kind::List(inner) => match inner.as_ref() {
                    Kind::Table(t) => t,
                    _ => &[],
                },
                _ => &[],
            };
            found = Some(f);
        }
        found.unwrap()
    }

    #[test]
    fn the_schema_follows_the_raw_structs() {
        let s = schema().unwrap();
        assert_eq!(field(&s, "server.listen").kind, Kind::Str);
        assert!(field(&s, "server.listen").optional);
        assert_eq!(field(&s, "server.max_connections").kind, Kind::Int);
        assert_eq!(field(&s, "storage.high_watermark").kind, Kind::Float);
        assert_eq!(field(&s, "storage.s3.path_style").kind, Kind::Bool);
        assert!(field(&s, "storage.s3").optional);
        assert!(!field(&s, "storage").optional, "serde(default), not Option");
        assert_eq!(field(&s, "offline").kind, Kind::Bool);
        let up = field(&s, "upstreams");
        assert!(matches!(&up.kind, Kind::List(t) if matches!(**t, Kind::Table(_))));
        assert!(!field(&s, "upstreams.host").optional, "required");
        assert_eq!(
            field(&s, "upstreams.allow").kind,
            Kind::List(Box::new(Kind::Str))
        );
        assert_eq!(
            field(&s, "auth.access.users").kind,
            Kind::List(Box::new(Kind::Str))
        );
        assert_eq!(field(&s, "hosted.delete").kind, Kind::Bool);
    }
}
