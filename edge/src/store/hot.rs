//! The hot tier: the rows terminals touch now (open orders and their lines and payments, open
//! shifts, master data), in memory with secondary indexes. The writer updates it in place after
//! each commit; rows that stop being hot (a closed order and its children) are evicted, so memory
//! follows the schema's [`HotRule`]s, not the length of history.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use shared::{HotRule, Row, Schema, Value, Version};

/// The tier's maps hash with foldhash (seeded per process), not SipHash: the writer updates
/// them for every change it commits.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A secondary index of a hot table: one column's values and the ids of the rows holding them.
#[derive(Debug)]
struct HotIndex {
    column: String,
    /// Where the column sits in the table's rows.
    position: usize,
    ids: Map<Value, BTreeSet<String>>,
}

impl HotIndex {
    fn value<'r>(&self, row: &'r Row) -> &'r Value {
        match row.columns.get(self.position) {
            Some(c) if *c == self.column => &row.values[self.position],
            _ => row.get(&self.column),
        }
    }

    fn add(&mut self, value: &Value, id: &str) {
        match self.ids.get_mut(value) {
            Some(ids) => {
                ids.insert(id.to_owned());
            }
            None => {
                self.ids
                    .insert(value.clone(), BTreeSet::from([id.to_owned()]));
            }
        }
    }

    fn remove(&mut self, value: &Value, id: &str) {
        if let Some(ids) = self.ids.get_mut(value) {
            ids.remove(id);
            if ids.is_empty() {
                self.ids.remove(value);
            }
        }
    }
}

#[derive(Debug, Default)]
struct HotTable {
    rows: Map<String, Arc<Row>>,
    /// For indexed columns and hot-parent references.
    indexes: Vec<HotIndex>,
}

impl HotTable {
    fn index(&self, column: &str) -> Option<&HotIndex> {
        self.indexes.iter().find(|i| i.column == column)
    }

    /// Puts a row, replacing the one with its id; an index is touched only where the row's
    /// value changed (an order's payment leaves its `status` and `table_id` entries alone).
    fn put(&mut self, row: Arc<Row>) {
        match self.rows.get_mut(&row.id) {
            Some(slot) => {
                let old = std::mem::replace(slot, row);
                let new = &*slot;
                for idx in &mut self.indexes {
                    let (before, after) = (idx.value(&old), idx.value(new));
                    if before != after {
                        idx.remove(before, &old.id);
                        idx.add(after, &new.id);
                    }
                }
            }
            None => {
                for idx in &mut self.indexes {
                    idx.add(idx.value(&row), &row.id);
                }
                self.rows.insert(row.id.clone(), row);
            }
        }
    }

    fn evict(&mut self, id: &str) -> Option<Arc<Row>> {
        let old = self.rows.remove(id)?;
        for idx in &mut self.indexes {
            idx.remove(idx.value(&old), &old.id);
        }
        Some(old)
    }
}

/// One row change as the hot tier sees it.
pub struct HotChange<'a> {
    pub table: usize,
    pub deleted: bool,
    pub row: &'a Arc<Row>,
}

/// The in-memory tier, consistent with the commit `version` it carries.
#[derive(Debug)]
pub struct HotTier {
    version: Version,
    rules: Vec<HotRule>,
    /// For each table, the tables whose hot rule names it as parent, with the column.
    children: Vec<Vec<(usize, String)>>,
    /// For `WithParent` tables: the parent's table index.
    parent: Vec<Option<usize>>,
    tables: Vec<HotTable>,
}

impl HotTier {
    pub fn new(schema: &Schema, version: Version) -> HotTier {
        let n = schema.tables().len();
        let mut children = vec![Vec::new(); n];
        let mut parent = vec![None; n];
        let mut tables: Vec<HotTable> = (0..n).map(|_| HotTable::default()).collect();
        for (i, t) in schema.tables().iter().enumerate() {
            if let HotRule::WithParent { column, table } = &t.hot {
                // Schema::new checked that the parent exists.
                let p = schema.table_index(table).expect("hot parent exists");
                children[p].push((i, column.clone()));
                parent[i] = Some(p);
            }
            tables[i].indexes = t
                .index_columns()
                .into_iter()
                .map(|c| HotIndex {
                    column: c.to_owned(),
                    // Schema::new checked that indexed and parent columns exist.
                    position: t.column_index(c).expect("indexed column exists"),
                    ids: Map::default(),
                })
                .collect();
        }
        HotTier {
            version,
            rules: schema.tables().iter().map(|t| t.hot.clone()).collect(),
            children,
            parent,
            tables,
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn set_version(&mut self, v: Version) {
        self.version = v;
    }

    /// Whether rows of `table` that are absent here may exist in SQLite.
    pub fn is_complete(&self, table: usize) -> bool {
        matches!(self.rules[table], HotRule::All)
    }

    pub fn caches(&self, table: usize) -> bool {
        !matches!(self.rules[table], HotRule::None)
    }

    /// Whether `row` of `table` belongs in the hot tier given the current contents.
    pub fn wants(&self, table: usize, row: &Row) -> bool {
        match &self.rules[table] {
            HotRule::All => true,
            HotRule::None => false,
            HotRule::Unless { column, values } => !values.contains(row.get(column)),
            HotRule::WithParent { column, .. } => match (row.get(column), self.parent[table]) {
                (Value::Text(pid), Some(p)) => self.tables[p].rows.contains_key(pid),
                _ => false,
            },
        }
    }

    pub fn get(&self, table: usize, id: &str) -> Option<&Arc<Row>> {
        self.tables[table].rows.get(id)
    }

    pub fn rows(&self, table: usize) -> impl Iterator<Item = &Arc<Row>> {
        self.tables[table].rows.values()
    }

    /// Ids of hot rows of `table` whose indexed `column` equals `value`; `None` when the column
    /// has no index.
    pub fn lookup(&self, table: usize, column: &str, value: &Value) -> Option<Vec<&Arc<Row>>> {
        let t = &self.tables[table];
        let idx = t.index(column)?;
        Some(
            idx.ids
                .get(value)
                .into_iter()
                .flatten()
                .filter_map(|id| t.rows.get(id))
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.tables.iter().map(|t| t.rows.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts a row loaded from SQLite (start-up, or the children of a parent that became hot).
    pub fn load(&mut self, table: usize, row: Arc<Row>) {
        if self.wants(table, &row) {
            self.tables[table].put(row);
        }
    }

    /// Applies one committed change in place. Returns the table and id of a parent row that
    /// just became hot, whose children the caller must load from SQLite.
    pub fn apply(&mut self, change: HotChange<'_>) -> Option<(usize, String)> {
        let HotChange {
            table,
            deleted,
            row,
        } = change;
        if !self.caches(table) {
            return None;
        }
        let was_hot = self.tables[table].rows.contains_key(&row.id);
        if !deleted && self.wants(table, row) {
            self.tables[table].put(row.clone());
            let has_children = !self.children[table].is_empty();
            return (!was_hot && has_children).then(|| (table, row.id.clone()));
        }
        if self.tables[table].evict(&row.id).is_some() {
            self.evict_children(table, &row.id);
        }
        None
    }

    fn evict_children(&mut self, table: usize, id: &str) {
        let key = Value::Text(id.to_owned());
        for (child, column) in self.children[table].clone() {
            let ids: Vec<String> = self.tables[child]
                .index(&column)
                .and_then(|idx| idx.ids.get(&key))
                .map(|ids| ids.iter().cloned().collect())
                .unwrap_or_default();
            for cid in ids {
                self.tables[child].evict(&cid);
            }
        }
    }

    /// The tables (and their referencing column) whose hot rows hang off `table`'s rows.
    pub fn children_of(&self, table: usize) -> &[(usize, String)] {
        &self.children[table]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{Timestamp, pos};

    fn row(s: &Schema, table: usize, id: &str, fields: &[(&str, &str)]) -> Arc<Row> {
        let columns = s.columns(table).clone();
        let mut row = Row {
            id: id.into(),
            version: 1,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            seq: None,
            values: vec![Value::Null; columns.len()],
            columns,
        };
        for (k, v) in fields {
            assert!(row.set(k, Value::Text(v.to_string())));
        }
        Arc::new(row)
    }

    #[test]
    fn closing_an_order_evicts_it_and_its_lines() {
        let s = pos::schema();
        let (o, l) = (
            s.table_index("order_header").unwrap(),
            s.table_index("order_line").unwrap(),
        );
        let mut h = HotTier::new(&s, Version(0));
        let open = row(&s, o, "o1", &[("status", "open")]);
        let parent = h.apply(HotChange {
            table: o,
            deleted: false,
            row: &open,
        });
        assert_eq!(parent, Some((o, "o1".to_string())));
        let line = row(&s, l, "l1", &[("order_id", "o1"), ("station_id", "grill")]);
        h.apply(HotChange {
            table: l,
            deleted: false,
            row: &line,
        });
        let orphan = row(&s, l, "l2", &[("order_id", "nope")]);
        h.apply(HotChange {
            table: l,
            deleted: false,
            row: &orphan,
        });
        assert_eq!(h.len(), 2);
        let grill = h
            .lookup(l, "station_id", &Value::Text("grill".into()))
            .unwrap();
        assert_eq!(grill.len(), 1);
        let closed = row(&s, o, "o1", &[("status", "closed")]);
        h.apply(HotChange {
            table: o,
            deleted: false,
            row: &closed,
        });
        assert!(h.is_empty());
        assert!(
            h.lookup(l, "station_id", &Value::Text("grill".into()))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_update_moves_only_the_index_entries_whose_value_changed() {
        let s = pos::schema();
        let (o, l) = (
            s.table_index("order_header").unwrap(),
            s.table_index("order_line").unwrap(),
        );
        let mut h = HotTier::new(&s, Version(0));
        let put = |h: &mut HotTier, table, row: &Arc<Row>| {
            h.apply(HotChange {
                table,
                deleted: false,
                row,
            })
        };
        let ids = |h: &HotTier, column: &str, value: &str| -> Vec<String> {
            let mut ids: Vec<String> = h
                .lookup(l, column, &Value::Text(value.into()))
                .unwrap()
                .into_iter()
                .map(|r| r.id.clone())
                .collect();
            ids.sort();
            ids
        };
        put(&mut h, o, &row(&s, o, "o1", &[("status", "open")]));
        for id in ["l1", "l2"] {
            let line = row(&s, l, id, &[("order_id", "o1"), ("station_id", "grill")]);
            put(&mut h, l, &line);
        }
        assert_eq!(ids(&h, "station_id", "grill"), ["l1", "l2"]);

        // l1 moves to the bar: one entry moves, the order's entry stays.
        let moved = row(
            &s,
            l,
            "l1",
            &[
                ("order_id", "o1"),
                ("station_id", "bar"),
                ("status", "preparing"),
            ],
        );
        put(&mut h, l, &moved);
        assert_eq!(ids(&h, "station_id", "grill"), ["l2"]);
        assert_eq!(ids(&h, "station_id", "bar"), ["l1"]);
        assert_eq!(ids(&h, "status", "preparing"), ["l1"]);
        assert_eq!(ids(&h, "order_id", "o1"), ["l1", "l2"]);
        assert_eq!(
            h.get(l, "l1").unwrap().get("status"),
            &Value::Text("preparing".into())
        );

        // A change to a column without an index leaves every lookup as it was.
        let named = row(
            &s,
            l,
            "l1",
            &[
                ("order_id", "o1"),
                ("station_id", "bar"),
                ("status", "preparing"),
                ("name", "Soup"),
            ],
        );
        put(&mut h, l, &named);
        assert_eq!(ids(&h, "station_id", "bar"), ["l1"]);
        assert_eq!(ids(&h, "order_id", "o1"), ["l1", "l2"]);
        assert_eq!(
            h.get(l, "l1").unwrap().get("name"),
            &Value::Text("Soup".into())
        );
        assert_eq!(h.len(), 3);

        // Closing the order evicts both lines from every index.
        put(&mut h, o, &row(&s, o, "o1", &[("status", "closed")]));
        assert!(h.is_empty());
        for (column, value) in [
            ("station_id", "bar"),
            ("station_id", "grill"),
            ("order_id", "o1"),
        ] {
            assert!(ids(&h, column, value).is_empty(), "{column} = {value}");
        }
    }
}
