//! Schemas: modules, tables, typed columns, owners, kinds, hot-tier rules and role permissions.
//!
//! A [`Schema`] is built either by [`crate::pos::schema`] (the built-in `pos` module) or from a
//! JSON file with [`Schema::from_json`]. Both paths go through [`Schema::new`], which checks every
//! name and reference, so a `Schema` value is always valid: names are safe SQL identifiers,
//! hot-tier parents exist, and indexed columns are real columns.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::value::{Columns, Value};

/// Most tables a module may declare.
pub const TABLES_MAX: usize = 256;
/// Most user columns a table may declare.
pub const COLUMNS_MAX: usize = 256;
/// Longest table or column name, in bytes.
pub const NAME_BYTES_MAX: usize = 63;

/// Columns every row has, maintained by the server.
pub const SYSTEM_COLUMNS: [&str; 5] = ["id", "version", "created_at", "updated_at", "seq"];

/// `log`: append-only, immutable rows. `state`: mutable by compare-and-set on `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    Log,
    State,
}

/// Who writes a table: the branch (replicated up), the hub (replicated down), or both
/// (concurrent edits resolved by a CRDT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    Branch,
    Hub,
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Text,
    Integer,
    /// Integer minor units (`12550` is 125.50).
    Money,
    Bool,
    Timestamp,
    Json,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Integer => "integer",
            ColumnType::Money => "money",
            ColumnType::Bool => "bool",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Json => "json",
        }
    }

    fn parse(name: &str) -> Option<ColumnType> {
        Some(match name {
            "text" => ColumnType::Text,
            "integer" => ColumnType::Integer,
            "money" => ColumnType::Money,
            "bool" => ColumnType::Bool,
            "timestamp" => ColumnType::Timestamp,
            "json" => ColumnType::Json,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    pub indexed: bool,
    /// Maintained by the server (derived totals, `seq`); a client setting it gets
    /// `read_only_column`.
    pub server_owned: bool,
}

/// Terminal roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Admin,
    Manager,
    Cashier,
    Waiter,
    Kitchen,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Manager,
        Role::Cashier,
        Role::Waiter,
        Role::Kitchen,
    ];

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::Cashier => "cashier",
            Role::Waiter => "waiter",
            Role::Kitchen => "kitchen",
        }
    }

    /// Admins and managers may do everything the table's kind and owner allow.
    pub fn is_privileged(self) -> bool {
        matches!(self, Role::Admin | Role::Manager)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which updates a role may make to a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum UpdateGrant {
    #[default]
    None,
    All,
    Columns(Vec<String>),
}

/// One role's rights on one table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Permission {
    pub read: bool,
    pub insert: bool,
    pub update: UpdateGrant,
    pub delete: bool,
}

impl Permission {
    pub fn read_only() -> Self {
        Permission {
            read: true,
            ..Permission::default()
        }
    }
    pub fn read_write() -> Self {
        Permission {
            read: true,
            insert: true,
            update: UpdateGrant::All,
            delete: true,
        }
    }
}

/// An operation a terminal asks to perform, for [`Table::allows`].
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    Read,
    Insert,
    Update { columns: &'a [&'a str] },
    Delete,
}

/// Which rows of a table the edge keeps in its in-memory hot tier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HotRule {
    /// Every row (master data, small tables).
    All,
    /// No row: history, served from SQLite.
    None,
    /// Rows whose `column` is not one of `values` (e.g. orders not closed or cancelled).
    Unless { column: String, values: Vec<Value> },
    /// Rows whose `column` references a hot row of `table` (the lines of open orders).
    WithParent { column: String, table: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Table {
    pub name: String,
    pub kind: TableKind,
    pub owner: Owner,
    pub columns: Vec<Column>,
    pub hot: HotRule,
    /// Sent before other pending entries by the sync protocol (payments).
    pub priority: bool,
    /// Rows are written only by the server itself (status logs), never by a terminal.
    pub server_written: bool,
    pub permissions: BTreeMap<Role, Permission>,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The position of a user column.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The columns that carry an index wherever rows are stored: the indexed ones, then the
    /// hot-parent reference if it is not one of them.
    pub fn index_columns(&self) -> Vec<&str> {
        let mut columns: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| c.indexed)
            .map(|c| c.name.as_str())
            .collect();
        if let HotRule::WithParent { column, .. } = &self.hot
            && !columns.contains(&column.as_str())
        {
            columns.push(column);
        }
        columns
    }

    /// Whether `role` may perform `access` on this table. Kind and owner limits (log rows are
    /// immutable, hub-owned tables are read-only at the edge) are checked by the store.
    pub fn allows(&self, role: Role, access: Access<'_>) -> bool {
        if let Access::Insert = access
            && self.server_written
        {
            return false;
        }
        if role.is_privileged() {
            return true;
        }
        let Some(p) = self.permissions.get(&role) else {
            return false;
        };
        match access {
            Access::Read => p.read,
            Access::Insert => p.insert,
            Access::Delete => p.delete,
            Access::Update { columns } => match &p.update {
                UpdateGrant::None => false,
                UpdateGrant::All => true,
                UpdateGrant::Columns(allowed) => {
                    columns.iter().all(|c| allowed.iter().any(|a| a == c))
                }
            },
        }
    }
}

/// A schema that failed to load or validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("schema file is not valid JSON: {0}")]
    Json(String),
    #[error("schema: {0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> SchemaError {
    SchemaError::Invalid(message.into())
}

/// A module: a named set of tables. Always valid once built.
#[derive(Debug, Clone)]
pub struct Schema {
    module: String,
    tables: Vec<Table>,
    by_name: HashMap<String, usize>,
    /// Per table, its user column names, shared by every row of the table.
    columns: Vec<Columns>,
    fingerprint: [u8; 32],
}

/// True for names usable unquoted in SQL and in URLs: `[a-z_][a-z0-9_]*`, at most 63 bytes.
pub fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        && name.len() <= NAME_BYTES_MAX
}

impl Schema {
    /// Validates and builds a schema.
    pub fn new(module: &str, tables: Vec<Table>) -> Result<Schema, SchemaError> {
        if !is_valid_name(module) {
            return Err(invalid(format!(
                "module name {module:?} must match [a-z_][a-z0-9_]* (at most {NAME_BYTES_MAX} bytes)"
            )));
        }
        if tables.is_empty() || tables.len() > TABLES_MAX {
            return Err(invalid(format!(
                "module {module:?} must declare 1 to {TABLES_MAX} tables"
            )));
        }
        let mut by_name = HashMap::new();
        for (i, t) in tables.iter().enumerate() {
            if !is_valid_name(&t.name) || t.name.starts_with('_') {
                return Err(invalid(format!(
                    "table name {:?} must match [a-z][a-z0-9_]* (at most {NAME_BYTES_MAX} bytes)",
                    t.name
                )));
            }
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(invalid(format!("table {:?} is declared twice", t.name)));
            }
            if t.columns.len() > COLUMNS_MAX {
                return Err(invalid(format!(
                    "table {:?} has more than {COLUMNS_MAX} columns",
                    t.name
                )));
            }
            let mut seen = Vec::new();
            for c in &t.columns {
                if !is_valid_name(&c.name) || c.name.starts_with('_') {
                    return Err(invalid(format!(
                        "column {}.{} must match [a-z][a-z0-9_]*",
                        t.name, c.name
                    )));
                }
                if SYSTEM_COLUMNS.contains(&c.name.as_str()) {
                    return Err(invalid(format!(
                        "column {}.{} is maintained by the server and cannot be declared",
                        t.name, c.name
                    )));
                }
                if seen.contains(&&c.name) {
                    return Err(invalid(format!(
                        "column {}.{} is declared twice",
                        t.name, c.name
                    )));
                }
                seen.push(&c.name);
            }
            if t.server_written && t.kind != TableKind::Log {
                return Err(invalid(format!(
                    "table {:?}: only log tables can be server-written",
                    t.name
                )));
            }
            for (role, p) in &t.permissions {
                if let UpdateGrant::Columns(cols) = &p.update {
                    for c in cols {
                        if t.column(c).is_none() {
                            return Err(invalid(format!(
                                "table {:?}: role {role} may update unknown column {c:?}",
                                t.name
                            )));
                        }
                    }
                }
            }
        }
        for t in &tables {
            match &t.hot {
                HotRule::All | HotRule::None => {}
                HotRule::Unless { column, .. } => {
                    if t.column(column).is_none() {
                        return Err(invalid(format!(
                            "table {:?}: hot rule names unknown column {column:?}",
                            t.name
                        )));
                    }
                }
                HotRule::WithParent { column, table } => {
                    if t.column(column).is_none() {
                        return Err(invalid(format!(
                            "table {:?}: hot rule names unknown column {column:?}",
                            t.name
                        )));
                    }
                    let Some(&pi) = by_name.get(table) else {
                        return Err(invalid(format!(
                            "table {:?}: hot rule names unknown parent table {table:?}",
                            t.name
                        )));
                    };
                    // One level of parentage keeps eviction a single indexed step.
                    if !matches!(tables[pi].hot, HotRule::Unless { .. } | HotRule::All) {
                        return Err(invalid(format!(
                            "table {:?}: hot parent {table:?} must itself use an `all` or `unless` rule",
                            t.name
                        )));
                    }
                }
            }
        }
        // The fingerprint only decides whether start-up re-checks the database layout; a
        // change in Debug formatting merely costs one re-check.
        let fingerprint = *blake3::hash(format!("{module}\n{tables:?}").as_bytes()).as_bytes();
        let columns = tables
            .iter()
            .map(|t| t.columns.iter().map(|c| c.name.clone()).collect())
            .collect();
        Ok(Schema {
            module: module.to_owned(),
            tables,
            by_name,
            columns,
            fingerprint,
        })
    }

    pub fn module(&self) -> &str {
        &self.module
    }

    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.by_name.get(name).map(|&i| &self.tables[i])
    }

    /// The user column names of table `ti`, shared by its rows.
    pub fn columns(&self, ti: usize) -> &Columns {
        &self.columns[ti]
    }

    /// Index of a table in [`Schema::tables`].
    pub fn table_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// blake3 over the schema's full description; equal schemas have equal fingerprints.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Loads a schema from its JSON description. See `docs` in the repository's README for the
    /// format; every error names the table and column at fault.
    pub fn from_json(text: &str) -> Result<Schema, SchemaError> {
        let doc: file::SchemaFile =
            serde_json::from_str(text).map_err(|e| SchemaError::Json(e.to_string()))?;
        doc.into_schema()
    }
}

/// The JSON file format for schemas. Kept apart from the domain types so the file format can
/// evolve without touching them.
mod file {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;
    use crate::json::value_from_json;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct SchemaFile {
        module: String,
        tables: Vec<TableFile>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TableFile {
        name: String,
        kind: String,
        owner: String,
        columns: Vec<ColumnFile>,
        #[serde(default)]
        hot: Option<HotFile>,
        #[serde(default)]
        priority: bool,
        #[serde(default)]
        server_written: bool,
        #[serde(default)]
        permissions: BTreeMap<String, Vec<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ColumnFile {
        name: String,
        #[serde(rename = "type")]
        ty: String,
        #[serde(default)]
        indexed: bool,
        #[serde(default)]
        server_owned: bool,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    enum HotFile {
        All,
        None,
        Unless {
            column: String,
            values: Vec<serde_json::Value>,
        },
        WithParent {
            column: String,
            table: String,
        },
    }

    impl SchemaFile {
        pub(super) fn into_schema(self) -> Result<Schema, SchemaError> {
            let mut tables = Vec::with_capacity(self.tables.len());
            for t in self.tables {
                tables.push(t.into_table()?);
            }
            Schema::new(&self.module, tables)
        }
    }

    impl TableFile {
        fn into_table(self) -> Result<Table, SchemaError> {
            let name = self.name;
            let kind = match self.kind.as_str() {
                "log" => TableKind::Log,
                "state" => TableKind::State,
                other => {
                    return Err(invalid(format!(
                        "table {name:?}: kind {other:?} is not \"log\" or \"state\""
                    )));
                }
            };
            let owner = match self.owner.as_str() {
                "branch" => Owner::Branch,
                "hub" => Owner::Hub,
                "shared" => Owner::Shared,
                other => {
                    return Err(invalid(format!(
                        "table {name:?}: owner {other:?} is not \"branch\", \"hub\" or \"shared\""
                    )));
                }
            };
            let mut columns = Vec::with_capacity(self.columns.len());
            for c in self.columns {
                let ty = ColumnType::parse(&c.ty).ok_or_else(|| {
                    invalid(format!(
                        "column {name}.{}: type {:?} is not one of text, integer, money, bool, timestamp, json",
                        c.name, c.ty
                    ))
                })?;
                columns.push(Column {
                    name: c.name,
                    ty,
                    indexed: c.indexed,
                    server_owned: c.server_owned,
                });
            }
            let hot = match self.hot {
                None if kind == TableKind::Log => HotRule::None,
                None | Some(HotFile::All) => HotRule::All,
                Some(HotFile::None) => HotRule::None,
                Some(HotFile::WithParent { column, table }) => {
                    HotRule::WithParent { column, table }
                }
                Some(HotFile::Unless { column, values }) => {
                    let ty = columns
                        .iter()
                        .find(|c| c.name == column)
                        .map(|c| c.ty)
                        .ok_or_else(|| {
                            invalid(format!(
                                "table {name:?}: hot rule names unknown column {column:?}"
                            ))
                        })?;
                    let values = values
                        .iter()
                        .map(|v| value_from_json(ty, v))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|expected| {
                            invalid(format!(
                                "table {name:?}: hot rule values for {column:?} must be {expected}"
                            ))
                        })?;
                    HotRule::Unless { column, values }
                }
            };
            let mut permissions = BTreeMap::new();
            for (role_name, grants) in self.permissions {
                let role = Role::parse(&role_name).ok_or_else(|| {
                    invalid(format!("table {name:?}: unknown role {role_name:?}"))
                })?;
                let mut p = Permission::default();
                for g in grants {
                    match g.as_str() {
                        "read" => p.read = true,
                        "insert" => p.insert = true,
                        "delete" => p.delete = true,
                        "update" => p.update = UpdateGrant::All,
                        other => match other.strip_prefix("update:") {
                            Some(col) => match &mut p.update {
                                UpdateGrant::All => {}
                                UpdateGrant::Columns(cols) => cols.push(col.to_owned()),
                                UpdateGrant::None => {
                                    p.update = UpdateGrant::Columns(vec![col.to_owned()])
                                }
                            },
                            None => {
                                return Err(invalid(format!(
                                    "table {name:?}: role {role_name}: unknown grant {other:?} (read, insert, update, update:COLUMN, delete)"
                                )));
                            }
                        },
                    }
                }
                permissions.insert(role, p);
            }
            Ok(Table {
                name,
                kind,
                owner,
                columns,
                hot,
                priority: self.priority,
                server_written: self.server_written,
                permissions,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(json: &str, needle: &str) {
        match Schema::from_json(json) {
            Ok(_) => panic!("accepted: {json}"),
            Err(e) => assert!(e.to_string().contains(needle), "{e} lacks {needle:?}"),
        }
    }

    const SHOP: &str = r#"{"module":"shop","tables":[
        {"name":"sale","kind":"log","owner":"branch","priority":true,
         "columns":[{"name":"amount","type":"money"},{"name":"till","type":"text","indexed":true}],
         "permissions":{"cashier":["read","insert"],"kitchen":["read"]}},
        {"name":"ticket","kind":"state","owner":"branch",
         "columns":[{"name":"status","type":"text"}],
         "hot":{"unless":{"column":"status","values":["done"]}},
         "permissions":{"kitchen":["read","update:status"]}}
    ]}"#;

    #[test]
    fn loads_a_small_schema() {
        let s = Schema::from_json(SHOP).unwrap();
        assert_eq!(s.module(), "shop");
        let sale = s.table("sale").unwrap();
        assert_eq!(sale.hot, HotRule::None);
        assert!(sale.priority);
        assert!(sale.allows(Role::Cashier, Access::Insert));
        assert!(!sale.allows(Role::Kitchen, Access::Insert));
        let ticket = s.table("ticket").unwrap();
        assert!(ticket.allows(
            Role::Kitchen,
            Access::Update {
                columns: &["status"]
            }
        ));
        assert!(!ticket.allows(Role::Waiter, Access::Read));
        let again = Schema::from_json(&SHOP.replace('\n', " ")).unwrap();
        assert_eq!(s.fingerprint(), again.fingerprint());
        let other = Schema::from_json(&SHOP.replace("\"done\"", "\"finished\"")).unwrap();
        assert_ne!(s.fingerprint(), other.fingerprint());
    }

    #[test]
    fn rejects_bad_schemas_with_clear_errors() {
        check_err("{", "not valid JSON");
        check_err(r#"{"module":"Pos","tables":[]}"#, "module name");
        check_err(r#"{"module":"pos","tables":[]}"#, "1 to 256 tables");
        let t = |body: &str| format!(r#"{{"module":"m","tables":[{body}]}}"#);
        check_err(
            &t(r#"{"name":"a b","kind":"log","owner":"branch","columns":[]}"#),
            "table name",
        );
        check_err(
            &t(r#"{"name":"a","kind":"heap","owner":"branch","columns":[]}"#),
            "kind \"heap\"",
        );
        check_err(
            &t(r#"{"name":"a","kind":"log","owner":"me","columns":[]}"#),
            "owner \"me\"",
        );
        check_err(
            &t(
                r#"{"name":"a","kind":"log","owner":"hub","columns":[{"name":"x","type":"float"}]}"#,
            ),
            "type \"float\"",
        );
        check_err(
            &t(
                r#"{"name":"a","kind":"log","owner":"hub","columns":[{"name":"version","type":"integer"}]}"#,
            ),
            "maintained by the server",
        );
        check_err(
            &t(
                r#"{"name":"a","kind":"log","owner":"hub","columns":[{"name":"x","type":"text"},{"name":"x","type":"text"}]}"#,
            ),
            "declared twice",
        );
        check_err(
            &t(
                r#"{"name":"a","kind":"log","owner":"hub","columns":[],"permissions":{"chef":["read"]}}"#,
            ),
            "unknown role",
        );
        check_err(
            &t(
                r#"{"name":"a","kind":"state","owner":"hub","columns":[],"permissions":{"waiter":["update:nope"]}}"#,
            ),
            "unknown column",
        );
        check_err(
            &t(
                r#"{"name":"a","kind":"state","owner":"hub","columns":[],"hot":{"with_parent":{"column":"x","table":"b"}}}"#,
            ),
            "unknown column",
        );
        check_err(
            &t(
                r#"{"name":"a","kind":"state","owner":"hub","columns":[{"name":"s","type":"integer"}],"hot":{"unless":{"column":"s","values":["x"]}}}"#,
            ),
            "must be",
        );
        check_err(
            &t(r#"{"name":"a","kind":"state","owner":"hub","columns":[],"extra":1}"#),
            "unknown field",
        );
    }
}
