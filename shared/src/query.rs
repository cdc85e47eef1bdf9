//! Read queries (CONTRACT 2.2): the checked query types, their parsing from JSON bodies with
//! stable error codes, and in-memory matching. The edge and the hub each compile a
//! [`QuerySpec`] to SQL with bound parameters; the edge's live feed filters rows with
//! [`Filter::matches`].

use serde_json::{Map, Value as Json};

use crate::json::value_from_json;
use crate::schema::{ColumnType, Schema};
use crate::value::{Row, Value};

/// Rows one query returns when it gives no `limit`.
pub const QUERY_LIMIT_DEFAULT: usize = 100;
/// Most rows one query returns.
pub const QUERY_LIMIT_MAX: usize = 1000;
/// Largest offset accepted: deeper pages should filter on an ordered column instead.
pub const QUERY_OFFSET_MAX: usize = 100_000;
/// Most values in one `IN` list.
pub const QUERY_IN_VALUES_MAX: usize = 1000;
/// Most filters, and most order terms, in one query.
pub const QUERY_TERMS_MAX: usize = 32;
/// Most columns one `select` lists.
pub const QUERY_SELECT_MAX: usize = 300;
/// Longest `like` pattern, in characters. SQLite refuses patterns over 50,000 bytes (an
/// error that would otherwise reach the terminal as a 500), and a live feed's filter is
/// matched against every commit on the thread that answers writes: a search pattern is short.
pub const LIKE_PATTERN_MAX: usize = 256;

const _: () = assert!(QUERY_LIMIT_DEFAULT <= QUERY_LIMIT_MAX);

/// The members of a CONTRACT 2.2 query body.
pub const QUERY_MEMBERS: [&str; 6] = ["table", "select", "where", "orderBy", "limit", "offset"];

/// Why a query body was refused: a stable snake_case code (`invalid_body`, `invalid_value`,
/// `invalid_parameter`, `unknown_column`) and a sentence. The HTTP layers answer 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct QueryError {
    pub code: &'static str,
    pub message: String,
}

impl QueryError {
    pub fn new(code: &'static str, message: impl Into<String>) -> QueryError {
        QueryError {
            code,
            message: message.into(),
        }
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::new(code, message)
}

/// Client text quoted in a message, cut to 64 characters.
pub fn excerpt(text: &str) -> String {
    text.chars().take(64).collect()
}

/// `unknown_column` for column `c` of `table`.
pub fn unknown_column(table: &str, c: &str) -> QueryError {
    bad(
        "unknown_column",
        format!("table {table} has no column {:?}", excerpt(c)),
    )
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Like,
}

impl Cmp {
    pub fn parse(op: &str) -> Option<Cmp> {
        Some(match op {
            "=" | "==" => Cmp::Eq,
            "!=" | "<>" => Cmp::Ne,
            "<" => Cmp::Lt,
            "<=" => Cmp::Le,
            ">" => Cmp::Gt,
            ">=" => Cmp::Ge,
            "like" | "LIKE" => Cmp::Like,
            _ => return None,
        })
    }

    /// The SQL operator, for the query compilers of the edge and the hub.
    pub fn sql(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Like => "LIKE",
        }
    }
}

/// One condition on a column; the values are typed for the column already.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Compare(String, Cmp, Value),
    /// The values are sorted and without repeats ([`parse_where`] builds it).
    In(String, Vec<Value>),
    IsNull(String),
}

/// A checked query. Build it with column names from [`column_type`].
#[derive(Debug, Clone, PartialEq)]
pub struct QuerySpec {
    pub table: usize,
    pub filters: Vec<Filter>,
    /// `(column, descending)`.
    pub order: Vec<(String, bool)>,
    pub limit: usize,
    pub offset: usize,
}

/// The type of a queryable column of table `ti`: the server's columns and the user columns.
pub fn column_type(schema: &Schema, ti: usize, name: &str) -> Option<ColumnType> {
    match name {
        "id" => Some(ColumnType::Text),
        "version" | "seq" => Some(ColumnType::Integer),
        "created_at" | "updated_at" => Some(ColumnType::Timestamp),
        _ => schema.tables()[ti].column(name).map(|c| c.ty),
    }
}

/// The value of a queryable column of a row, server columns included.
pub fn row_value(row: &Row, name: &str) -> Value {
    row_value_ref(row, name).into_owned()
}

/// [`row_value`] without copying a user column's value (a live feed's filter runs on the
/// thread that answers writes).
fn row_value_ref<'r>(row: &'r Row, name: &str) -> std::borrow::Cow<'r, Value> {
    use std::borrow::Cow;
    match name {
        "id" => Cow::Owned(Value::Text(row.id.clone())),
        "version" => Cow::Owned(Value::Int(row.version as i64)),
        "created_at" => Cow::Owned(Value::Timestamp(row.created_at)),
        "updated_at" => Cow::Owned(Value::Timestamp(row.updated_at)),
        "seq" => Cow::Owned(row.seq.map_or(Value::Null, |s| Value::Int(s as i64))),
        _ => Cow::Borrowed(row.get(name)),
    }
}

/// SQL `LIKE` in memory: `%` matches any run, `_` one character, ASCII letters ignore case.
///
/// Linear in the text, since a live feed's filter runs on the thread that answers writes:
/// the pattern is cut at each `%` into pieces; the first must match at the start and the last
/// at the end, and each one between is taken at its leftmost place after the one before it
/// (a later place only leaves less text for the rest), found with a bit-parallel search in
/// which `_` matches anything. Backtracking instead costs text × pattern on some patterns.
fn like(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.chars().map(|c| c.to_ascii_lowercase()).collect();
    let p: Vec<char> = pattern.chars().map(|c| c.to_ascii_lowercase()).collect();
    let pieces: Vec<&[char]> = p.split(|c| *c == '%').collect();
    let [first, middle @ .., last] = pieces.as_slice() else {
        // No `%`: the whole text, one character for each of the pattern's.
        return t.len() == p.len() && piece_at(&t, 0, &p);
    };
    if t.len() < first.len() || !piece_at(&t, 0, first) {
        return false;
    }
    let mut at = first.len();
    for piece in middle.iter().filter(|p| !p.is_empty()) {
        match find(&t[at..], piece) {
            Some(start) => at += start + piece.len(),
            None => return false,
        }
    }
    t.len() - at >= last.len() && piece_at(&t, t.len() - last.len(), last)
}

/// Whether `piece` matches `t` at `at` (`_` matching any character); `t` holds enough.
fn piece_at(t: &[char], at: usize, piece: &[char]) -> bool {
    t[at..at + piece.len()]
        .iter()
        .zip(piece)
        .all(|(c, p)| *p == '_' || p == c)
}

/// Where `piece` (not empty) first matches in `t`, `_` matching any character: the Shift-And
/// search, one bit per piece position, over as many 64-bit words as the piece needs.
fn find(t: &[char], piece: &[char]) -> Option<usize> {
    let m = piece.len();
    let words = m.div_ceil(64);
    let bit = |j: usize| (j / 64, 1u64 << (j % 64));
    // For each character, the positions it matches; `_` positions match every character.
    let mut any = vec![0u64; words];
    for (j, c) in piece.iter().enumerate() {
        if *c == '_' {
            let (w, b) = bit(j);
            any[w] |= b;
        }
    }
    let mut masks: std::collections::HashMap<char, Vec<u64>> = std::collections::HashMap::new();
    for (j, c) in piece.iter().enumerate().filter(|(_, c)| **c != '_') {
        let (w, b) = bit(j);
        masks.entry(*c).or_insert_with(|| any.clone())[w] |= b;
    }
    let (last_word, last_bit) = bit(m - 1);
    let mut state = vec![0u64; words];
    for (i, c) in t.iter().enumerate() {
        let mask = masks.get(c).unwrap_or(&any);
        let mut carry = 1u64;
        for (s, k) in state.iter_mut().zip(mask) {
            let out = *s >> 63;
            *s = ((*s << 1) | carry) & k;
            carry = out;
        }
        if state[last_word] & last_bit != 0 {
            return Some(i + 1 - m);
        }
    }
    None
}

impl Filter {
    /// Whether a row satisfies the condition, with SQL's meaning (null matches only IS NULL).
    pub fn matches(&self, row: &Row) -> bool {
        match self {
            Filter::IsNull(c) => row_value_ref(row, c).is_null(),
            // The list is sorted and without repeats (see `parse_where`).
            Filter::In(c, values) => {
                let v = row_value_ref(row, c);
                !v.is_null() && values.binary_search(&v).is_ok()
            }
            Filter::Compare(c, cmp, value) => {
                let v = row_value_ref(row, c);
                if v.is_null() {
                    return false;
                }
                match cmp {
                    Cmp::Eq => *v == *value,
                    Cmp::Ne => *v != *value,
                    Cmp::Lt => *v < *value,
                    Cmp::Le => *v <= *value,
                    Cmp::Gt => *v > *value,
                    Cmp::Ge => *v >= *value,
                    Cmp::Like => match (v.as_ref(), value) {
                        (Value::Text(t), Value::Text(p)) => like(t, p),
                        _ => false,
                    },
                }
            }
        }
    }
}

/// A typed value for column `c`.
fn typed(ty: ColumnType, c: &str, v: &Json) -> Result<Value, QueryError> {
    value_from_json(ty, v).map_err(|expected| {
        bad(
            "invalid_value",
            format!("values for {c:?} must be {expected}"),
        )
    })
}

/// The body as an object whose members are all in `members` (the [`QUERY_MEMBERS`], plus
/// whatever the caller's API adds).
pub fn query_object<'a>(
    body: &'a Json,
    members: &[&str],
) -> Result<&'a Map<String, Json>, QueryError> {
    let q = body
        .as_object()
        .ok_or_else(|| bad("invalid_body", "a query is a JSON object"))?;
    if let Some(k) = q.keys().find(|k| !members.contains(&k.as_str())) {
        return Err(bad(
            "invalid_body",
            format!(
                "unknown query member {:?} ({})",
                excerpt(k),
                members.join(", ")
            ),
        ));
    }
    Ok(q)
}

/// The query's `table` member, unchecked: the caller resolves it (and answers 404 or 403).
pub fn query_table(q: &Map<String, Json>) -> Result<&str, QueryError> {
    match q.get("table") {
        Some(Json::String(t)) => Ok(t.as_str()),
        _ => Err(bad("invalid_body", "a query needs \"table\": a table name")),
    }
}

/// A bounded non-negative integer member of the query.
pub fn parse_count(
    q: &Map<String, Json>,
    name: &str,
    default: usize,
    max: usize,
) -> Result<usize, QueryError> {
    match q.get(name) {
        None | Some(Json::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max as u64 => Ok(n as usize),
            _ => Err(bad(
                "invalid_parameter",
                format!("\"{name}\" must be an integer from 0 to {max}"),
            )),
        },
    }
}

/// Parses a `select` list of table `ti`'s columns; `None` selects every column.
pub fn parse_select(
    schema: &Schema,
    ti: usize,
    select: Option<&Json>,
) -> Result<Option<Vec<String>>, QueryError> {
    let t = &schema.tables()[ti];
    match select {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Array(cols)) if cols.len() <= QUERY_SELECT_MAX => {
            let mut names = Vec::with_capacity(cols.len());
            for c in cols {
                let c = c
                    .as_str()
                    .ok_or_else(|| bad("invalid_body", "\"select\" lists column names"))?;
                column_type(schema, ti, c).ok_or_else(|| unknown_column(&t.name, c))?;
                names.push(c.to_owned());
            }
            Ok(Some(names))
        }
        Some(_) => Err(bad("invalid_body", "\"select\" lists column names")),
    }
}

/// Parses a `where` object (CONTRACT 2.2) for table `ti`: a scalar is equality, an array is
/// IN, null is IS NULL, `{"op": .., "value": ..}` a comparison. Also used by feed filters.
pub fn parse_where(
    schema: &Schema,
    ti: usize,
    filter: Option<&Json>,
) -> Result<Vec<Filter>, QueryError> {
    let t = &schema.tables()[ti];
    let ty_of = |c: &str| column_type(schema, ti, c).ok_or_else(|| unknown_column(&t.name, c));
    let mut filters = Vec::new();
    match filter {
        None | Some(Json::Null) => {}
        Some(Json::Object(w)) if w.len() <= QUERY_TERMS_MAX => {
            for (c, v) in w {
                let ty = ty_of(c)?;
                filters.push(match v {
                    Json::Null => Filter::IsNull(c.clone()),
                    Json::Array(vs) if vs.len() <= QUERY_IN_VALUES_MAX => {
                        // Sorted and without repeats, so that a feed matches a row against
                        // the list by binary search; SQL's IN means the same either way.
                        let mut values = vs
                            .iter()
                            .map(|v| typed(ty, c, v))
                            .collect::<Result<Vec<_>, _>>()?;
                        values.sort_unstable();
                        values.dedup();
                        Filter::In(c.clone(), values)
                    }
                    Json::Array(_) => {
                        return Err(bad(
                            "invalid_parameter",
                            format!("an IN list holds at most {QUERY_IN_VALUES_MAX} values"),
                        ));
                    }
                    Json::Object(o) => {
                        let op = o
                            .get("op")
                            .and_then(Json::as_str)
                            .and_then(Cmp::parse)
                            .ok_or_else(|| {
                                bad(
                                    "invalid_value",
                                    format!("{c:?}: \"op\" must be one of = != < <= > >= like"),
                                )
                            })?;
                        let value = o.get("value").unwrap_or(&Json::Null);
                        if op == Cmp::Like && !(ty == ColumnType::Text && value.is_string()) {
                            return Err(bad(
                                "invalid_value",
                                format!("{c:?}: like compares a text column with a string"),
                            ));
                        }
                        if op == Cmp::Like
                            && value
                                .as_str()
                                .is_some_and(|p| p.chars().nth(LIKE_PATTERN_MAX).is_some())
                        {
                            return Err(bad(
                                "invalid_value",
                                format!(
                                    "{c:?}: a like pattern is at most {LIKE_PATTERN_MAX} characters"
                                ),
                            ));
                        }
                        match (op, typed(ty, c, value)?) {
                            (Cmp::Eq, Value::Null) => Filter::IsNull(c.clone()),
                            (_, Value::Null) => {
                                return Err(bad(
                                    "invalid_value",
                                    format!("{c:?}: only = compares with null"),
                                ));
                            }
                            (op, v) => Filter::Compare(c.clone(), op, v),
                        }
                    }
                    scalar => Filter::Compare(c.clone(), Cmp::Eq, typed(ty, c, scalar)?),
                });
            }
        }
        Some(_) => {
            return Err(bad(
                "invalid_body",
                format!("\"where\" is an object of at most {QUERY_TERMS_MAX} columns"),
            ));
        }
    }
    Ok(filters)
}

/// Parses an `orderBy` list into `(field, descending)` terms. `check_field` decides which
/// fields may be named (the table's columns at the edge; group columns and aggregate names too
/// at the hub) and gives the error for the others.
pub fn parse_order(
    order_by: Option<&Json>,
    mut check_field: impl FnMut(&str) -> Result<(), QueryError>,
) -> Result<Vec<(String, bool)>, QueryError> {
    let mut order = Vec::new();
    match order_by {
        None | Some(Json::Null) => {}
        Some(Json::Array(terms)) if terms.len() <= QUERY_TERMS_MAX => {
            for term in terms {
                let field = term.get("field").and_then(Json::as_str).ok_or_else(|| {
                    bad(
                        "invalid_body",
                        "each orderBy term is {\"field\": column, \"direction\": \"asc\"|\"desc\"}",
                    )
                })?;
                check_field(field)?;
                let desc = match term.get("direction").and_then(Json::as_str) {
                    None | Some("asc") | Some("ASC") => false,
                    Some("desc") | Some("DESC") => true,
                    Some(_) => {
                        return Err(bad("invalid_value", "\"direction\" is \"asc\" or \"desc\""));
                    }
                };
                order.push((field.to_owned(), desc));
            }
        }
        Some(_) => {
            return Err(bad(
                "invalid_body",
                "\"orderBy\" is a list of {field, direction}",
            ));
        }
    }
    Ok(order)
}

/// Parses the members of a CONTRACT 2.2 body other than `table` for table `ti`: `select`,
/// `where`, `orderBy` (the table's columns), `limit` and `offset`, in that order. Returns the
/// spec and the selected columns (`None`: all).
pub fn parse_spec(
    schema: &Schema,
    ti: usize,
    q: &Map<String, Json>,
) -> Result<(QuerySpec, Option<Vec<String>>), QueryError> {
    let t = &schema.tables()[ti];
    let select = parse_select(schema, ti, q.get("select"))?;
    let filters = parse_where(schema, ti, q.get("where"))?;
    let order = parse_order(q.get("orderBy"), |field| {
        column_type(schema, ti, field)
            .map(|_| ())
            .ok_or_else(|| unknown_column(&t.name, field))
    })?;
    let spec = QuerySpec {
        table: ti,
        filters,
        order,
        limit: parse_count(q, "limit", QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX)?,
        offset: parse_count(q, "offset", 0, QUERY_OFFSET_MAX)?,
    };
    Ok((spec, select))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::pos;
    use crate::value::Columns;

    #[test]
    fn like_matches_as_sql_does() {
        for (t, p, want) in [
            ("Grill", "grill", true),
            ("grill station", "grill%", true),
            ("the grill", "%grill", true),
            ("bar", "b_r", true),
            ("bar", "b_", false),
            ("", "%", true),
            ("abc", "a%c%", true),
            ("abc", "a%d", false),
        ] {
            assert_eq!(like(t, p), want, "{t:?} LIKE {p:?}");
        }
    }

    /// The textbook matcher: two pointers, backtracking to the last `%`. Slow on some
    /// patterns (text × pattern), plainly right; the reference for `like`.
    fn like_by_backtracking(text: &str, pattern: &str) -> bool {
        let t: Vec<char> = text.chars().map(|c| c.to_ascii_lowercase()).collect();
        let p: Vec<char> = pattern.chars().map(|c| c.to_ascii_lowercase()).collect();
        let (mut ti, mut pi) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
                ti += 1;
                pi += 1;
            } else if pi < p.len() && p[pi] == '%' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|c| *c == '%')
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 4000,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Small alphabets (case, `é`, the wildcards) so that pieces match, overlap and repeat.
        #[test]
        fn like_agrees_with_backtracking(
            text in "[abABé]{0,24}",
            pattern in "[abABé_%]{0,10}",
        ) {
            proptest::prop_assert_eq!(like(&text, &pattern), like_by_backtracking(&text, &pattern));
        }

        /// Pieces longer than one 64-bit word of the bit-parallel search, cut from the text
        /// itself (some characters turned into `_`, sometimes one changed) so that they match
        /// about as often as not.
        #[test]
        fn like_agrees_with_backtracking_on_long_pieces(
            text in "[ab]{70,300}",
            start in 0usize..100,
            len in 65usize..200,
            wild in proptest::collection::vec(proptest::bool::weighted(0.2), 200),
            changed in proptest::option::of(0usize..200),
            percent in (proptest::bool::ANY, proptest::bool::ANY),
        ) {
            let chars: Vec<char> = text.chars().collect();
            let start = start.min(chars.len() - 65);
            let end = (start + len).min(chars.len());
            let mut piece: Vec<char> = chars[start..end].to_vec();
            for (c, w) in piece.iter_mut().zip(&wild) {
                if *w {
                    *c = '_';
                }
            }
            if let Some(i) = changed.filter(|i| *i < piece.len()) {
                piece[i] = if piece[i] == 'a' { 'b' } else { 'a' };
            }
            let piece: String = piece.into_iter().collect();
            let pattern = format!(
                "{}{piece}{}",
                if percent.0 { "%" } else { "" },
                if percent.1 { "%" } else { "" },
            );
            proptest::prop_assert_eq!(like(&text, &pattern), like_by_backtracking(&text, &pattern));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..Default::default()
        })]

        /// An IN list in any order and with repeats matches exactly the rows whose value is
        /// one of the list's (the matcher binary-searches the list `parse_where` sorted).
        #[test]
        fn in_lists_match_their_members(
            amounts in proptest::collection::vec(-5i64..5, 0..12),
            methods in proptest::collection::vec("[abc]{0,2}", 0..12),
            row_amount in proptest::option::of(-6i64..6),
            row_method in proptest::option::of("[abc]{0,2}"),
        ) {
            let s = pos::schema();
            let ti = s.table_index("order_payment").expect("a pos table");
            let filters = parse_where(
                &s,
                ti,
                Some(&json!({"amount": amounts.clone(), "method": methods.clone()})),
            )
            .expect("a valid filter");
            let columns: Columns = s.tables()[ti].columns.iter().map(|c| c.name.clone()).collect();
            let mut row = Row {
                id: "p1".into(),
                version: 1,
                created_at: crate::value::Timestamp(0),
                updated_at: crate::value::Timestamp(0),
                seq: Some(1),
                values: vec![Value::Null; columns.len()],
                columns,
            };
            proptest::prop_assert!(row.set("amount", row_amount.map_or(Value::Null, Value::Int)));
            proptest::prop_assert!(row.set("method", row_method.clone().map_or(Value::Null, Value::Text)));
            let want = row_amount.is_some_and(|a| amounts.contains(&a))
                && row_method.is_some_and(|m| methods.contains(&m));
            proptest::prop_assert_eq!(filters.iter().all(|f| f.matches(&row)), want);
        }
    }

    #[test]
    fn like_stays_right_on_a_pattern_that_makes_backtracking_slow() {
        let text = "a".repeat(65_536);
        let pattern = format!("%{}b", "a".repeat(254));
        assert!(!like(&text, &pattern));
        assert!(like(&format!("{text}b"), &pattern));
        assert!(like(&text, &format!("%{}", "a".repeat(255))));
    }

    fn parse(body: Json) -> Result<(QuerySpec, Option<Vec<String>>), QueryError> {
        let s = pos::schema();
        let q = query_object(&body, &QUERY_MEMBERS)?;
        let ti = s.table_index(query_table(q)?).expect("a pos table");
        parse_spec(&s, ti, q)
    }

    #[test]
    fn parses_a_full_body() {
        let (spec, select) = parse(json!({
            "table": "order_payment",
            "select": ["id", "amount"],
            "where": {"method": ["cash", "card"], "reference": null, "amount": {"op": ">=", "value": 100},
                      "order_id": "o1"},
            "orderBy": [{"field": "amount", "direction": "desc"}, {"field": "seq"}],
            "limit": 5,
            "offset": 10,
        }))
        .unwrap();
        assert_eq!(select, Some(vec!["id".to_owned(), "amount".to_owned()]));
        assert_eq!(spec.limit, 5);
        assert_eq!(spec.offset, 10);
        assert_eq!(
            spec.order,
            vec![("amount".to_owned(), true), ("seq".to_owned(), false)]
        );
        assert!(
            spec.filters
                .contains(&Filter::Compare("amount".into(), Cmp::Ge, Value::Int(100)))
        );
        assert!(spec.filters.contains(&Filter::IsNull("reference".into())));
        let (spec, select) = parse(json!({"table": "order_header"})).unwrap();
        assert_eq!(
            (spec.limit, spec.offset, select),
            (QUERY_LIMIT_DEFAULT, 0, None)
        );
    }

    #[test]
    fn refuses_bad_bodies_with_stable_codes() {
        let check = |body: Json, code: &str| {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.code, code, "{body}: {e}");
        };
        let sql_col = "notes\" OR 1=1 --";
        check(json!([1]), "invalid_body");
        check(json!({"where": {}}), "invalid_body");
        check(
            json!({"table": "order_header", "having": 1}),
            "invalid_body",
        );
        check(
            json!({"table": "order_header", "where": {sql_col: 1}}),
            "unknown_column",
        );
        check(
            json!({"table": "order_header", "select": [sql_col]}),
            "unknown_column",
        );
        check(
            json!({"table": "order_header", "orderBy": [{"field": sql_col}]}),
            "unknown_column",
        );
        check(
            json!({"table": "order_header", "orderBy": [{"field": "id", "direction": "up"}]}),
            "invalid_value",
        );
        check(
            json!({"table": "order_header", "where": {"total_amount": {"op": "like", "value": "1%"}}}),
            "invalid_value",
        );
        // A pattern of 256 characters (multi-byte ones included) is taken, one more is not.
        let pattern = |n: usize| json!({"table": "order_header", "where": {"notes": {"op": "like", "value": "é".repeat(n)}}});
        assert!(parse(pattern(LIKE_PATTERN_MAX)).is_ok());
        check(pattern(LIKE_PATTERN_MAX + 1), "invalid_value");
        check(
            json!({"table": "order_header", "where": {"status": {"op": "<", "value": null}}}),
            "invalid_value",
        );
        check(
            json!({"table": "order_header", "limit": -1}),
            "invalid_parameter",
        );
        check(
            json!({"table": "order_header", "limit": 1001}),
            "invalid_parameter",
        );
        check(
            json!({"table": "order_header", "offset": u64::MAX}),
            "invalid_parameter",
        );
        let e = parse(json!({"table": "order_header", "having": 1})).unwrap_err();
        assert_eq!(
            e.message,
            "unknown query member \"having\" (table, select, where, orderBy, limit, offset)"
        );
    }
}
