//! Run-time expansion of a job's arguments, as Swarming's `run_isolated` does it.
//!
//! An argument may name, in `${NAME}` form, values only the worker knows: where the shard's
//! outputs go and which shard it is. The worker replaces them just before it starts the
//! command; the job spec (and so the job id) keeps the text as written.
//!
//! | written | becomes |
//! |---|---|
//! | `${GRID_OUTPUT_DIR}`, `${ISOLATED_OUTDIR}` | the shard's output directory (Swarming's name too) |
//! | `${GRID_SHARD_INDEX}` | the shard's index, from 0 |
//! | `${GRID_TOTAL_SHARDS}` | the job's shard count |
//! | `$$` | `$` |
//!
//! Any other `$` is left as it is (so `$HOME` or `${HOME}` reach a shell untouched), except that
//! a name starting with `GRID_` that is not in the table is refused when the spec is checked: it
//! is a typo, and running with it unexpanded would only fail later and further away.
//!
//! ```
//! use grid_protocol::expand::{Vars, expand};
//!
//! let vars = Vars { output_dir: "/out", shard_index: 2, total_shards: 8 };
//! assert_eq!(expand("--gtest_output=xml:${GRID_OUTPUT_DIR}/r.xml", &vars), "--gtest_output=xml:/out/r.xml");
//! assert_eq!(expand("shard ${GRID_SHARD_INDEX} of ${GRID_TOTAL_SHARDS}", &vars), "shard 2 of 8");
//! assert_eq!(expand("$${GRID_OUTPUT_DIR} costs $5", &vars), "${GRID_OUTPUT_DIR} costs $5");
//! ```

/// The values a worker expands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vars<'a> {
    /// The shard's output directory, as the command sees it (inside the sandbox, if any).
    pub output_dir: &'a str,
    /// The shard's index, from 0.
    pub shard_index: u32,
    /// The job's shard count.
    pub total_shards: u32,
}

/// The names [`expand`] replaces.
pub const NAMES: [&str; 4] =
    ["GRID_OUTPUT_DIR", "ISOLATED_OUTDIR", "GRID_SHARD_INDEX", "GRID_TOTAL_SHARDS"];

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<String> {
        match name {
            "GRID_OUTPUT_DIR" | "ISOLATED_OUTDIR" => Some(self.output_dir.to_string()),
            "GRID_SHARD_INDEX" => Some(self.shard_index.to_string()),
            "GRID_TOTAL_SHARDS" => Some(self.total_shards.to_string()),
            _ => None,
        }
    }
}

/// One piece of an argument: text to keep, or a `${NAME}` reference.
enum Piece<'a> {
    Text(&'a str),
    Dollar,
    Var(&'a str),
}

/// Splits `arg` into text, `$$` and `${NAME}` pieces.
fn pieces(arg: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        if i > 0 {
            out.push(Piece::Text(&rest[..i]));
        }
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push(Piece::Dollar);
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{')
            && let Some(end) = body.find('}')
            && is_name(&body[..end])
        {
            out.push(Piece::Var(&body[..end]));
            rest = &body[end + 1..];
        } else {
            out.push(Piece::Text("$"));
            rest = after;
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// `arg` with every known `${NAME}` replaced and `$$` made `$`.
pub fn expand(arg: &str, vars: &Vars<'_>) -> String {
    let mut out = String::with_capacity(arg.len());
    for p in pieces(arg) {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Dollar => out.push('$'),
            Piece::Var(name) => match vars.get(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str("${");
                    out.push_str(name);
                    out.push('}');
                }
            },
        }
    }
    out
}

/// The first `${GRID_...}` name in `arg` that [`expand`] does not know, if any.
pub fn unknown_grid_name(arg: &str) -> Option<&str> {
    pieces(arg).into_iter().find_map(|p| match p {
        Piece::Var(name) if name.starts_with("GRID_") && !NAMES.contains(&name) => Some(name),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: Vars<'static> = Vars { output_dir: "/o", shard_index: 3, total_shards: 4 };

    #[test]
    fn known_names_are_replaced_everywhere_in_an_argument() {
        assert_eq!(expand("${ISOLATED_OUTDIR}/a:${GRID_OUTPUT_DIR}", &V), "/o/a:/o");
        assert_eq!(expand("${GRID_SHARD_INDEX}${GRID_TOTAL_SHARDS}", &V), "34");
    }

    #[test]
    fn everything_else_is_left_as_written() {
        for a in
            ["$HOME", "${HOME}", "$", "a$", "${", "${}", "${1x}", "${GRID_OUTPUT_DIR", "€${X}€"]
        {
            assert_eq!(expand(a, &V), a, "{a}");
        }
    }

    #[test]
    fn a_double_dollar_is_one_dollar_and_escapes_a_name() {
        assert_eq!(expand("$$", &V), "$");
        assert_eq!(expand("$$$$", &V), "$$");
        assert_eq!(expand("$${GRID_SHARD_INDEX}", &V), "${GRID_SHARD_INDEX}");
        assert_eq!(expand("$$$${GRID_SHARD_INDEX}", &V), "$${GRID_SHARD_INDEX}");
        assert_eq!(expand("$$${GRID_SHARD_INDEX}", &V), "$3");
    }

    #[test]
    fn an_unknown_grid_name_is_found_and_others_are_not() {
        assert_eq!(unknown_grid_name("x ${GRID_OUTPUT_DIRR}/y"), Some("GRID_OUTPUT_DIRR"));
        assert_eq!(unknown_grid_name("${GRID_OUTPUT_DIR} ${HOME} $GRID_X"), None);
        assert_eq!(unknown_grid_name("$${GRID_NOPE}"), None);
    }
}
