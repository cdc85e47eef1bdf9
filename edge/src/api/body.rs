//! Write bodies read straight from the request's bytes. Rows go from JSON text to typed
//! values against the table's schema (`shared::json_rows`) without a `serde_json::Value`
//! tree; only the small members around them (an update's `version`, a batch op's `op`,
//! `table`, `id` and `version`) are read as JSON values. Text that is not JSON is always
//! `invalid_json`, whatever else is wrong with it: what is skipped is checked as fully as a
//! parsed document would be (`shared::json_rows::Skip`).

use std::fmt;

use axum::http::StatusCode;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;
use serde_json::value::RawValue;
use shared::Table;
use shared::json::InsertInput;
use shared::json_rows::{
    BodyError, Key, RowKind, RowRefusal, RowSeed, Skip, from_slice_seed, row_from_slice,
};

use super::{ApiError, ApiResult};
use crate::store::TXN_OPS_MAX;

/// The answer to a body that is not JSON.
pub(super) fn not_json(e: serde_json::Error) -> ApiError {
    ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
}

fn not_object(what: &str) -> ApiError {
    ApiError::bad_request("invalid_body", format!("{what} must be a JSON object"))
}

/// Why a row was refused, as an answer; `what` names the row ("the row").
fn refusal(r: RowRefusal, what: &str) -> ApiError {
    match r {
        RowRefusal::NotObject => not_object(what),
        RowRefusal::Field { error, .. } => error.into(),
    }
}

/// `text` as one row object of `table`.
pub(super) fn row(table: &Table, kind: RowKind, text: &[u8], what: &str) -> ApiResult<InsertInput> {
    row_from_slice(table, kind, text).map_err(|e| match e {
        BodyError::Syntax(e) => not_json(e),
        BodyError::Refused(r) => refusal(r, what),
    })
}

/// An update's `set` as `table`'s columns, or why it was refused.
pub(super) fn set(table: &Table, set: &RawValue) -> ApiResult<Result<InsertInput, RowRefusal>> {
    match row_from_slice(table, RowKind::Update, set.get().as_bytes()) {
        Ok(set) => Ok(Ok(set)),
        Err(BodyError::Refused(r)) => Ok(Err(r)),
        Err(BodyError::Syntax(e)) => Err(not_json(e)),
    }
}

/// Reads all of `text` with `seed`.
fn parse<'de, S: DeserializeSeed<'de>>(text: &'de [u8], seed: S) -> ApiResult<S::Value> {
    from_slice_seed(text, seed).map_err(not_json)
}

/// An update, `{"version": N, "set": {column: value, ...}}`; other members are ignored.
pub(super) struct UpdateBody {
    pub version: Option<Json>,
    /// The `set` read as the table's columns, or why it was refused; `None` if absent.
    pub set: Option<Result<InsertInput, RowRefusal>>,
}

/// `text` as an update of a row of `table`.
pub(super) fn update(table: &Table, text: &[u8]) -> ApiResult<UpdateBody> {
    parse(text, Object(UpdateMembers(table)))?.ok_or_else(|| not_object("the update"))
}

/// One op of a batch, as given; rows are kept as text until the op's table is known.
#[derive(Default)]
pub(super) struct OpBody<'de> {
    pub op: Option<Json>,
    pub table: Option<Json>,
    pub id: Option<Json>,
    pub version: Option<Json>,
    pub row: Option<&'de RawValue>,
    pub set: Option<&'de RawValue>,
}

/// `text` as a batch, `{"ops": [op, ...]}` with 1 to [`TXN_OPS_MAX`] ops; each op is `None`
/// if it is not a JSON object.
pub(super) fn batch(text: &[u8]) -> ApiResult<Vec<Option<OpBody<'_>>>> {
    let shape = || {
        ApiError::bad_request(
            "invalid_body",
            "a batch is {\"ops\": [op, ...]} with at least one op",
        )
    };
    let ops = parse(text, Object(BatchMembers))?.ok_or_else(|| not_object("a batch"))?;
    match ops {
        Some(Ops::List(ops)) if !ops.is_empty() => Ok(ops),
        Some(Ops::TooMany) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a batch holds at most {TXN_OPS_MAX} ops"),
        )),
        _ => Err(shape()),
    }
}

/// Reads a JSON object's members; any other value is read to its end and is `None`.
struct Object<M>(M);

/// What to make of an object's members.
trait Members<'de> {
    type Out;
    fn members<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error>;
}

impl<'de, M: Members<'de>> DeserializeSeed<'de> for Object<M> {
    type Value = Option<M::Out>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, M: Members<'de>> Visitor<'de> for Object<M> {
    type Value = Option<M::Out>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.members(map).map(Some)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
}

struct UpdateMembers<'t>(&'t Table);

impl<'de> Members<'de> for UpdateMembers<'_> {
    type Out = UpdateBody;

    fn members<A: MapAccess<'de>>(self, mut map: A) -> Result<UpdateBody, A::Error> {
        let mut body = UpdateBody {
            version: None,
            set: None,
        };
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "version" => body.version = Some(map.next_value()?),
                "set" => {
                    let seed = RowSeed {
                        table: self.0,
                        kind: RowKind::Update,
                    };
                    body.set = Some(map.next_value_seed(seed)?);
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(body)
    }
}

struct BatchMembers;

/// A batch's `ops`: a list of ops, too many of them, or not a list.
enum Ops<'de> {
    List(Vec<Option<OpBody<'de>>>),
    TooMany,
    Other,
}

impl<'de> Members<'de> for BatchMembers {
    type Out = Option<Ops<'de>>;

    fn members<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Ops<'de>>, A::Error> {
        let mut ops = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "ops" {
                ops = Some(map.next_value_seed(OpsSeed)?);
            } else {
                map.next_value::<Skip>()?;
            }
        }
        Ok(ops)
    }
}

struct OpsSeed;

impl<'de> DeserializeSeed<'de> for OpsSeed {
    type Value = Ops<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Ops<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for OpsSeed {
    type Value = Ops<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of ops")
    }

    /// Keeps at most one op more than a batch may hold (to tell it is too many); the rest
    /// is read to its end.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ops<'de>, A::Error> {
        let mut ops = Vec::new();
        while ops.len() <= TXN_OPS_MAX {
            match seq.next_element_seed(Object(OpMembers))? {
                Some(op) => ops.push(op),
                None => return Ok(Ops::List(ops)),
            }
        }
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Ops::TooMany)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ops<'de>, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Ops::Other)
    }

    fn visit_unit<E>(self) -> Result<Ops<'de>, E> {
        Ok(Ops::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Ops<'de>, E> {
        Ok(Ops::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Ops<'de>, E> {
        Ok(Ops::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Ops<'de>, E> {
        Ok(Ops::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Ops<'de>, E> {
        Ok(Ops::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Ops<'de>, E> {
        Ok(Ops::Other)
    }
}

struct OpMembers;

impl<'de> Members<'de> for OpMembers {
    type Out = OpBody<'de>;

    fn members<A: MapAccess<'de>>(self, mut map: A) -> Result<OpBody<'de>, A::Error> {
        let mut op = OpBody::default();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "op" => op.op = Some(map.next_value()?),
                "table" => op.table = Some(map.next_value()?),
                "id" => op.id = Some(map.next_value()?),
                "version" => op.version = Some(map.next_value()?),
                "row" => op.row = Some(map.next_value()?),
                "set" => op.set = Some(map.next_value()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn batch_ops_are_read_whatever_the_order_of_their_members() {
        let text = br#"{"x": [1, {"ops": 2}], "ops": [
            {"row": {"id": "o1", "status": "open"}, "op": "insert", "table": "order_header"},
            {"table": "order_header", "set": {"status": "closed"}, "version": 3, "id": "o1", "op": "update", "extra": {}},
            7,
            {"op": "delete"}
        ]}"#;
        let ops = batch(text).unwrap();
        assert_eq!(ops.len(), 4);
        let first = ops[0].as_ref().unwrap();
        assert_eq!(first.table, Some(json!("order_header")));
        assert_eq!(
            first.row.unwrap().get(),
            r#"{"id": "o1", "status": "open"}"#
        );
        let second = ops[1].as_ref().unwrap();
        assert_eq!(second.op, Some(json!("update")));
        assert_eq!(second.version, Some(json!(3)));
        assert_eq!(second.id, Some(json!("o1")));
        assert_eq!(second.set.unwrap().get(), r#"{"status": "closed"}"#);
        assert!(ops[2].is_none(), "a number is not an op");
        assert!(ops[3].as_ref().unwrap().table.is_none());
    }

    #[test]
    fn batch_shapes_are_refused_with_their_codes() {
        let code = |text: &str| batch(text.as_bytes()).err().map(|e| (e.status, e.code));
        let shape = Some((StatusCode::BAD_REQUEST, "invalid_body"));
        assert_eq!(code(r#"{"ops": []}"#), shape);
        assert_eq!(code(r#"{"ops": {}}"#), shape);
        assert_eq!(code(r#"{"ops": null}"#), shape);
        assert_eq!(code(r#"{"opz": [{}]}"#), shape);
        assert_eq!(code(r#"[{"ops": [{}]}]"#), shape);
        assert_eq!(
            code(r#"{"ops": [{}]"#),
            Some((StatusCode::BAD_REQUEST, "invalid_json"))
        );
        assert_eq!(
            code(r#"{"ops": [{}]} {}"#),
            Some((StatusCode::BAD_REQUEST, "invalid_json"))
        );
        let ops = |n: usize| format!(r#"{{"ops": [{}]}}"#, vec!["{}"; n].join(","));
        assert_eq!(
            batch(ops(TXN_OPS_MAX).as_bytes()).unwrap().len(),
            TXN_OPS_MAX
        );
        assert_eq!(
            code(&ops(TXN_OPS_MAX + 1)),
            Some((StatusCode::PAYLOAD_TOO_LARGE, "too_large"))
        );
        assert_eq!(
            code(&ops(5 * TXN_OPS_MAX)),
            Some((StatusCode::PAYLOAD_TOO_LARGE, "too_large"))
        );
    }

    /// What is skipped is still checked: bad UTF-8, lone surrogates, bad escapes and nesting
    /// past the depth limit anywhere make the body `invalid_json`, as a parsed document would.
    #[test]
    fn skipped_members_are_checked_as_json() {
        let schema = shared::pos::schema();
        let t = schema.table("order_header").unwrap();
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let bad: [&[u8]; 4] = [b"\"\xff\"", br#""\ud800""#, br#""\q""#, deep.as_bytes()];
        let around = |before: &str, value: &[u8], after: &str| {
            [before.as_bytes(), value, after.as_bytes()].concat()
        };
        for value in bad {
            let texts = [
                around(
                    r#"{"version": 1, "set": {"status": "x"}, "note": "#,
                    value,
                    "}",
                ),
                around(
                    r#"{"ops": [{"op": "delete", "table": "t", "id": "i", "x": "#,
                    value,
                    "}]}",
                ),
                around(r#"{"note": "#, value, r#", "ops": [{"op": "delete"}]}"#),
            ];
            let shown = String::from_utf8_lossy(value)
                .chars()
                .take(12)
                .collect::<String>();
            assert_eq!(
                update(t, &texts[0]).err().map(|e| e.code),
                Some("invalid_json"),
                "{shown}"
            );
            for text in &texts[1..] {
                assert_eq!(
                    batch(text).err().map(|e| e.code),
                    Some("invalid_json"),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn an_update_reads_its_version_and_set() {
        let schema = shared::pos::schema();
        let t = schema.table("order_header").unwrap();
        let u = update(
            t,
            br#"{"set": {"status": "closed"}, "note": 1, "version": 4}"#,
        )
        .unwrap();
        assert_eq!(u.version, Some(json!(4)));
        let set = u.set.unwrap().unwrap();
        assert_eq!(set.fields["status"], shared::Value::Text("closed".into()));
        let u = update(t, br#"{"version": 4, "set": [1]}"#).unwrap();
        assert_eq!(u.set, Some(Err(RowRefusal::NotObject)));
        assert!(update(t, br#"{"version": 4}"#).unwrap().set.is_none());
        let e = update(t, b"[]").err().unwrap();
        assert_eq!(e.code, "invalid_body");
        let e = update(t, br#"{"set": {"status": 5, "notes": "x"}}"#)
            .unwrap()
            .set
            .unwrap()
            .unwrap_err();
        let RowRefusal::Field { error, mut columns } = e else {
            panic!("{e:?}");
        };
        assert_eq!(error.code(), "invalid_value");
        columns.sort();
        assert_eq!(
            columns,
            ["notes", "status"],
            "every column given, for the role check"
        );
    }
}
