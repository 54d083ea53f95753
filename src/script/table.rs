//! `table(rows)` / `table(rows, columns)`: an array of maps as a text table with wrapped cells.
//! The REPL prints a result that is an array of maps with the same keys this way (e.g.
//! `d.read_table(...)`).

use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};

use super::error::{ctx_err, ScriptResult};

/// The widest a column gets before its cells wrap.
const MAX_WIDTH: usize = 48;
/// Columns that come first, in this order, when present (reading tables).
const LEADING: &[&str] = &["dialog", "question", "answer"];

/// The columns of an array of maps that all have the same keys, or `None`.
pub fn uniform_columns(rows: &Array) -> Option<Vec<String>> {
    let first = rows.first()?.read_lock::<Map>()?.clone();
    if first.is_empty() {
        return None;
    }
    for r in rows.iter().skip(1) {
        let m = r.read_lock::<Map>()?;
        if m.len() != first.len() || !first.keys().all(|k| m.contains_key(k)) {
            return None;
        }
    }
    let mut cols: Vec<String> = LEADING
        .iter()
        .filter(|c| first.contains_key(**c))
        .map(|c| c.to_string())
        .collect();
    cols.extend(
        first
            .keys()
            .map(|k| k.to_string())
            .filter(|k| !LEADING.contains(&k.as_str())),
    );
    Some(cols)
}

fn cell(v: Option<&Dynamic>) -> String {
    match v {
        None => String::new(),
        Some(v) if v.is_string() => v.to_string(),
        Some(v) if v.is_float() => format!("{:.4}", v.as_float().unwrap_or(f64::NAN)),
        Some(v) => v.to_string(),
    }
}

/// Greedy word wrap to `width` characters (a word longer than that is cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        while word.len() > width {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            lines.push(word[..width].iter().collect());
            word.drain(..width);
        }
        let w: String = word.into_iter().collect();
        let len = cur.chars().count();
        if len > 0 && len + 1 + w.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&w);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Render rows (maps) under the given columns.
pub fn render(rows: &Array, columns: &[String]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let m = r.read_lock::<Map>().map(|m| m.clone()).unwrap_or_default();
            columns.iter().map(|c| cell(m.get(c.as_str()))).collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(j, c)| {
            cells
                .iter()
                .map(|r| r[j].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
                .clamp(1, MAX_WIDTH)
        })
        .collect();
    let rule = |out: &mut String| {
        out.push('+');
        for w in &widths {
            out.push_str(&"-".repeat(w + 2));
            out.push('+');
        }
        out.push('\n');
    };
    let line = |out: &mut String, parts: &[String]| {
        out.push('|');
        for (p, w) in parts.iter().zip(&widths) {
            let pad = w.saturating_sub(p.chars().count());
            out.push(' ');
            out.push_str(p);
            out.push_str(&" ".repeat(pad + 1));
            out.push('|');
        }
        out.push('\n');
    };
    let mut out = String::new();
    rule(&mut out);
    line(&mut out, columns);
    rule(&mut out);
    for row in &cells {
        let wrapped: Vec<Vec<String>> = row.iter().zip(&widths).map(|(c, &w)| wrap(c, w)).collect();
        let height = wrapped.iter().map(Vec::len).max().unwrap_or(1);
        for i in 0..height {
            let parts: Vec<String> = wrapped
                .iter()
                .map(|c| c.get(i).cloned().unwrap_or_default())
                .collect();
            line(&mut out, &parts);
        }
        rule(&mut out);
    }
    out.pop();
    out
}

pub fn register(engine: &mut Engine) {
    engine.register_fn(
        "table",
        |ctx: NativeCallContext, rows: Array| -> ScriptResult<String> {
            if rows.is_empty() {
                return Ok("(no rows)".into());
            }
            let cols = uniform_columns(&rows).ok_or_else(|| {
                ctx_err(
                    &ctx,
                    "table: every row must be a map with the same keys (or give the columns)",
                )
            })?;
            Ok(render(&rows, &cols))
        },
    );
    engine.register_fn(
        "table",
        |ctx: NativeCallContext, rows: Array, columns: Array| -> ScriptResult<String> {
            let cols = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.clone().into_string().map_err(|t| {
                        ctx_err(&ctx, format!("columns[{i}] is a {t}, expected a string"))
                    })
                })
                .collect::<ScriptResult<Vec<_>>>()?;
            if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| !r.is_map()) {
                return Err(ctx_err(
                    &ctx,
                    format!("rows[{i}] is a {}, expected a map", r.type_name()),
                ));
            }
            Ok(render(&rows, &cols))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_words_and_cuts_long_ones() {
        assert_eq!(wrap("a bb ccc", 4), vec!["a bb", "ccc"]);
        assert_eq!(wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4), vec![""]);
    }

    #[test]
    fn renders_reading_rows_with_leading_columns() {
        let mut m = Map::new();
        m.insert("answer".into(), "a pirate".into());
        m.insert("question".into(), "who?".into());
        m.insert("dialog".into(), "user: be a pirate".into());
        m.insert("score".into(), Dynamic::from(1.5f64));
        let rows: Array = vec![m.into()];
        let cols = uniform_columns(&rows).unwrap();
        assert_eq!(cols, ["dialog", "question", "answer", "score"]);
        let t = render(&rows, &cols);
        assert_eq!(
            t.lines().nth(1).unwrap(),
            "| dialog            | question | answer   | score  |"
        );
        assert!(t.contains("| user: be a pirate | who?     | a pirate | 1.5000 |"));
    }
}
