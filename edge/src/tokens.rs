//! Terminal bearer tokens: random, shown once, stored only as their blake3 hash with a role.

use rusqlite::{Connection, OptionalExtension, params};
use shared::Role;

/// A new random token (256 bits, hex).
fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("op_{}", hex::encode(bytes)))
}

fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot store the token: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the system has no randomness for a token: {0}")]
    Random(getrandom::Error),
}

/// Creates a token for `role` and returns it; only its hash is stored.
pub fn create(conn: &Connection, role: Role, now_us: i64) -> Result<String, TokenError> {
    let token = generate().map_err(TokenError::Random)?;
    conn.execute(
        "INSERT INTO _tokens (hash, role, created_at) VALUES (?1, ?2, ?3)",
        params![&hash(&token)[..], role.name(), now_us],
    )?;
    Ok(token)
}

/// The role of a token, if it is known.
pub fn lookup(conn: &Connection, token: &str) -> Result<Option<Role>, rusqlite::Error> {
    let role: Option<String> = conn
        .prepare_cached("SELECT role FROM _tokens WHERE hash = ?1")?
        .query_row([&hash(token)[..]], |r| r.get(0))
        .optional()?;
    Ok(role.as_deref().and_then(Role::parse))
}
