//! The `.isolate` source format: which files a test needs, as Chromium wrote it and read it.
//!
//! An `.isolate` file is a Python literal holding one dict with up to three keys:
//! `variables` (`files`, a list of paths where a trailing `/` means a whole directory, an
//! optional `command` and an optional `read_only`), `conditions` (a list of
//! `[expression, dict]` or `[expression, dict, else-dict]`, the expression in GYP style:
//! `OS=="linux" and asan==1`), and `includes` (other `.isolate` files, relative to the including
//! file's directory). Paths may use `<(NAME)` substitution. Files written before October 2014
//! list their paths under `isolate_dependency_tracked`, `isolate_dependency_untracked` and
//! `isolate_dependency_touched` instead of `files`; Chromium read all three as `files` (a
//! touched file is packed whole, like any other), and so does this module.
//!
//! This module owns parsing and evaluation. It does no IO: [`evaluate`] asks its caller for the
//! text of each file through a `load` callback. It does not look at the file system either:
//! whether a listed file exists, and what a directory holds, is the caller's business.
//!
//! Paths are handled lexically with `/` separators, as Chromium did. A path listed in a file is
//! relative to that file's directory, except one that starts with `<(NAME)`: Chromium never
//! rebased those, so their variable's value is taken relative to the ROOT file's directory.
//! Results are re-expressed relative to the root file's directory and may start with `../`.
//!
//! How Chromium merged what the files and their conditions say (its `isolate_format.py`), and
//! this module with it:
//! - Every `variables` dict that applies (a file's global one, and each condition's that holds)
//!   adds its files. Of the `command`s and `read_only`s that apply, ONE wins. Chromium ranked
//!   each dict by the variables it was matched with: none for a file's global dict, every known
//!   variable of its file (see below) for a condition's. At the first variable name, in sorted
//!   order, that one dict was matched with and the other was not, the one matched with it comes
//!   first; so a condition's dict comes before any global one. Dicts of the same rank
//!   keep the order of the including file: its own dicts (global, then conditions) in order,
//!   then its includes' from the LAST include to the first. The first dict with a command gives
//!   the command; the first with a `read_only` gives it.
//! - A file that gives a command anywhere (globally, or in any condition that some values of
//!   its variables satisfy, whatever the values given now) drops every command of the files it
//!   includes, directly or not.
//! - The command runs from the directory of the file that gave it; a command argument that
//!   starts with `<(NAME)` is a path like a `files` entry, its value re-expressed relative to
//!   that directory. Other uses of a variable in a command are replaced verbatim, and anything
//!   else (such as `${ISOLATED_OUTDIR}`, expanded on the worker) is left as written.
//! - Conditions compare as Python does: an integer literal equals a variable whose value is
//!   integer text (`n==1` holds for `n=01` and for `n=+1`), a string literal equals
//!   only the same text (`n=="1"` never holds when `n`'s value is an integer). Chromium only
//!   evaluated a condition with the values its file compares each variable with: a variable
//!   whose value is none of them is unknown, and a condition that needs an unknown variable
//!   (in Python's left-to-right, short-circuit order) does not hold. So with `OS=linux` in a file
//!   that never names `"linux"`, `OS=="win" or asan==1` does not hold, while
//!   `asan==1 or OS=="win"` does.
//!
//! Beyond what Chromium accepted, conditions may use `!=`, `not`, comparisons of two variables
//! or two literals, and an else-dict; such a condition is evaluated plainly with the values
//! given (no variable is unknown), and its else-dict applies when it does not hold. Stricter
//! than Python: adjacent string literals are not joined (a missing comma between two paths is
//! an error, not one merged path), keys may not repeat, and every variable a condition names
//! must be defined, even in a branch that short-circuits (as Chromium required).
//!
//! ```
//! use std::collections::BTreeMap;
//! use grid_protocol::isolate::{FileEntry, evaluate};
//!
//! let src = r#"{
//!   'variables': { 'files': ['<(PRODUCT_DIR)/unit_tests', 'data/'] },
//!   'conditions': [
//!     ['OS=="linux"', { 'variables': { 'files': ['linux.txt'] } }],
//!   ],
//! }"#;
//! let vars: BTreeMap<String, String> =
//!     [("OS".into(), "linux".into()), ("PRODUCT_DIR".into(), "../out".into())].into();
//! let isolate = evaluate("src/t.isolate", &vars, &mut |path| {
//!     assert_eq!(path, "src/t.isolate");
//!     Ok(src.to_string())
//! })
//! .unwrap();
//! let entry = |path: &str, is_dir| FileEntry { path: path.into(), is_dir };
//! assert_eq!(
//!     isolate.files,
//!     [entry("../out/unit_tests", false), entry("data", true), entry("linux.txt", false)]
//! );
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::rc::Rc;

use crate::manifest::{MAX_ENTRIES, MAX_PATH_BYTES};

/// Largest `.isolate` file accepted, in bytes.
pub const MAX_ISOLATE_BYTES: usize = 4 << 20;
/// Deepest nesting of lists and dicts in a file, and of parentheses and `not` in a condition.
pub const MAX_NESTING: usize = 64;
/// Most `.isolate` files in one chain of includes, the root included.
pub const MAX_INCLUDE_DEPTH: usize = 16;
/// Most file evaluations in one [`evaluate`] call, counting a file once per inclusion.
pub const MAX_INCLUDED_FILES: usize = 256;
/// Most distinct file entries in one result.
pub const MAX_FILE_ENTRIES: usize = MAX_ENTRIES;
/// Most bytes of evaluated strings (paths and command arguments after substitution) in one
/// [`evaluate`] call; bounds what `<(NAME)` substitution can make of a small file.
pub const MAX_EXPANDED_BYTES: usize = 64 << 20;
/// Most alternatives tried when deciding whether some values satisfy a condition (whether its
/// command counts as the file's); past it, the condition is taken as satisfiable, as every
/// condition with that many ways to hold is in practice.
pub const MAX_CONDITION_TERMS: usize = 4096;

/// One entry of the `files` lists: a file, or a directory standing for its whole tree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileEntry {
    /// Relative to the root `.isolate` file's directory, `/`-separated, lexically normalized,
    /// possibly starting with `../`, never ending in `/`. The root directory itself is `.`.
    pub path: String,
    /// Whether the entry was written with a trailing `/`: the directory and all beneath it.
    pub is_dir: bool,
}

/// The command an `.isolate` file gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The arguments, after substitution.
    pub args: Vec<String>,
    /// The directory of the file that gave the command, relative to the root file's directory
    /// (`.` for the root's own); Chromium ran the command from there.
    pub relative_cwd: String,
}

/// An evaluated `.isolate` file and its includes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolate {
    /// The files and directories the test needs, sorted by path, each path once.
    pub files: Vec<FileEntry>,
    /// The `command` that wins, as Chromium chose it (see the module docs).
    pub command: Option<Command>,
    /// The `read_only` that wins, chosen as the command is: 0 (files writable), 1 (files
    /// read-only) or 2 (files and directories read-only); `None` when no file gives one
    /// (Chromium then wrote 1).
    pub read_only: Option<u8>,
    /// Chromium's `isolate_dir`, relative to the root file's directory (`.` for its own): the
    /// directory of the file that gave the command, else of the first `variables` dict (in the
    /// command's order) that lists files, else the root file's. Chromium's tree root is the
    /// deepest directory holding it, every listed path and every `variable_dirs` entry.
    pub isolate_dir: String,
    /// The directories named by a variable that starts a `files` entry or an argument of the
    /// command (`<(PRODUCT_DIR)/unit_tests`), relative to the root file's directory, sorted.
    /// Chromium took every path variable into its tree root.
    pub variable_dirs: Vec<String>,
}

impl Default for Isolate {
    fn default() -> Self {
        Isolate {
            files: Vec::new(),
            command: None,
            read_only: None,
            isolate_dir: ".".into(),
            variable_dirs: Vec::new(),
        }
    }
}

/// A place in an `.isolate` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as given to the loader.
    pub file: String,
    /// Line, from 1.
    pub line: u32,
    /// Column in characters, from 1.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Why an `.isolate` file (or one it includes) cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsolateError {
    /// The loader could not provide the root file.
    #[error("cannot load {path:?}: {message}")]
    LoadRoot {
        /// The file.
        path: String,
        /// The loader's error.
        message: String,
    },
    /// The loader could not provide an included file.
    #[error("{at}: cannot load include {path:?}: {message}")]
    LoadInclude {
        /// Where the include is written.
        at: Location,
        /// The file, as given to the loader.
        path: String,
        /// The loader's error.
        message: String,
    },
    /// A file larger than [`MAX_ISOLATE_BYTES`].
    #[error("{file}: file is {size} bytes; the limit is {MAX_ISOLATE_BYTES}")]
    TooLarge {
        /// The file.
        file: String,
        /// Its size.
        size: usize,
    },
    /// Not a Python literal of the supported kind, or a malformed `<(NAME)`.
    #[error("{at}: {message}")]
    Syntax {
        /// Where.
        at: Location,
        /// What was expected and found.
        message: String,
    },
    /// Lists and dicts, or parentheses and `not`, nested deeper than [`MAX_NESTING`].
    #[error("{at}: nesting deeper than {MAX_NESTING} levels")]
    TooDeep {
        /// Where the level too many opens.
        at: Location,
    },
    /// A valid literal of the wrong shape for an `.isolate` file.
    #[error("{at}: {message}")]
    Shape {
        /// Where.
        at: Location,
        /// What was expected and found.
        message: String,
    },
    /// A condition that is not a valid expression.
    #[error("{at}: bad condition: {message}")]
    Condition {
        /// Where (inside the condition's string where it can be told).
        at: Location,
        /// What was expected and found.
        message: String,
    },
    /// A variable named in a condition or in `<(NAME)` that has no value.
    #[error("{at}: undefined variable {name:?}")]
    UndefinedVariable {
        /// Where it is named.
        at: Location,
        /// The variable.
        name: String,
    },
    /// A listed path or include that cannot be used.
    #[error("{at}: path {path:?}: {reason}")]
    BadPath {
        /// Where it is written.
        at: Location,
        /// The path, after substitution.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file that includes itself, directly or not.
    #[error("{at}: include cycle: {}", .chain.join(" -> "))]
    IncludeCycle {
        /// Where the include closing the cycle is written.
        at: Location,
        /// The files of the cycle, the first one repeated at the end.
        chain: Vec<String>,
    },
    /// A chain of includes longer than [`MAX_INCLUDE_DEPTH`].
    #[error("{at}: includes nested deeper than {MAX_INCLUDE_DEPTH} files")]
    IncludeDepth {
        /// Where the include one too deep is written.
        at: Location,
    },
    /// More than [`MAX_INCLUDED_FILES`] file evaluations.
    #[error("{at}: includes expand to more than {MAX_INCLUDED_FILES} files")]
    TooManyIncludes {
        /// Where the include one too many is written.
        at: Location,
    },
    /// More than [`MAX_FILE_ENTRIES`] distinct entries.
    #[error("{at}: more than {MAX_FILE_ENTRIES} file entries")]
    TooManyFiles {
        /// Where the entry one too many is written.
        at: Location,
    },
    /// Evaluated strings longer than [`MAX_EXPANDED_BYTES`] in total.
    #[error("{at}: strings expand to more than {MAX_EXPANDED_BYTES} bytes in total")]
    TooMuchExpansion {
        /// Where the string crossing the limit is written.
        at: Location,
    },
}

/// Evaluates the `.isolate` file at `root_path` and the files it includes.
///
/// `vars` gives the values of condition variables and of `<(NAME)` (the CLI's `--var`).
/// `load` returns the text of a file, or a message saying why it cannot; it is called once per
/// distinct file (it may refuse one over [`MAX_ISOLATE_BYTES`] without reading it all), with
/// `root_path` and include paths lexically normalized (`/`-separated, `.` and `x/..` folded,
/// leading `..` kept) and joined onto the including file's directory, so an include path is
/// relative to wherever `root_path` is relative to.
///
/// When `root_path` is relative, a command from an include above the directory it is relative
/// to may need that directory's name to re-express a `<(NAME)` path: [`evaluate_from`] gives it.
pub fn evaluate(
    root_path: &str,
    vars: &BTreeMap<String, String>,
    load: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<Isolate, IsolateError> {
    evaluate_from(None, root_path, vars, load)
}

/// As [`evaluate`], with `base`, the absolute `/`-separated directory that a relative
/// `root_path` (and so every loader path) is relative to. It is used only to express one path
/// relative to another that climbs higher with `..`, never passed to `load`.
pub fn evaluate_from(
    base: Option<&str>,
    root_path: &str,
    vars: &BTreeMap<String, String>,
    load: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<Isolate, IsolateError> {
    let root = normalize(root_path);
    let typed = vars.iter().map(|(k, v)| (k.clone(), PyValue::of_var(v))).collect();
    let mut ev = Evaluator {
        vars,
        typed,
        load,
        root_dir: parent(&root).to_string(),
        base: base.map(normalize),
        parsed: BTreeMap::new(),
        stack: Vec::new(),
        evaluations: 0,
        expanded: 0,
        files: BTreeMap::new(),
        variable_dirs: BTreeSet::new(),
    };
    let mut blocks = ev.file(&root, None)?;
    // Chromium's order (see the module docs); the sort is stable, so dicts of one rank keep
    // the order `file` gave them.
    blocks.sort_by(|a, b| key_order(&a.key, &b.key));
    let winner = blocks.iter().find(|b| b.command.is_some());
    let read_only = blocks.iter().find_map(|b| b.read_only);
    let dir = match winner.or_else(|| blocks.iter().find(|b| b.lists_files)) {
        Some(b) => b.dir.clone(),
        None => ev.root_dir.clone(),
    };
    let command = match winner.and_then(|b| b.command.as_ref().map(|c| (&b.dir, c))) {
        None => None,
        Some((cmd_dir, c)) => {
            let args = c
                .args
                .iter()
                .map(|(pos, s)| ev.substitute(&c.file, *pos, s, Some(cmd_dir)))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Command { args, relative_cwd: ev.relative_dir(cmd_dir) })
        }
    };
    let isolate_dir = ev.relative_dir(&dir);
    let files = ev.files.into_iter().map(|(path, is_dir)| FileEntry { path, is_dir }).collect();
    let variable_dirs = ev.variable_dirs.into_iter().collect();
    Ok(Isolate { files, command, read_only, isolate_dir, variable_dirs })
}

/// Chromium's order of two `variables` dicts by the variables each was matched with (sorted
/// names): at the first name where they differ, the dict bound to it comes first.
fn key_order(a: &[String], b: &[String]) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for (x, y) in a.iter().zip(b) {
        match x.cmp(y) {
            Ordering::Equal => {}
            // `x` is bound in `a` and not in `b`.
            Ordering::Less => return Ordering::Less,
            Ordering::Greater => return Ordering::Greater,
        }
    }
    // The shorter one lacks the other's next variable.
    b.len().cmp(&a.len())
}

/// A value as Python compares it in a condition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PyValue {
    /// An integer, as canonical decimal text (no leading zeros, no `+`, no `-0`).
    Int(String),
    /// A string.
    Str(String),
}

impl PyValue {
    /// A variable's value as Chromium's `isolate.py` took it from its command line: an integer
    /// when Python's `int()` accepts the text, else the text.
    fn of_var(text: &str) -> PyValue {
        python_int(text).map_or_else(|| PyValue::Str(text.to_string()), PyValue::Int)
    }
}

/// What Python's `int(text)` makes of `text`, as canonical decimal text: surrounding
/// whitespace, one sign and ASCII digits, single underscores between digits.
fn python_int(text: &str) -> Option<String> {
    let t = text.trim();
    let (negative, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let well_formed = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '_')
        && !digits.starts_with('_')
        && !digits.ends_with('_')
        && !digits.contains("__");
    if !well_formed {
        return None;
    }
    let d: String = digits.chars().filter(|&c| c != '_').collect();
    let d = d.trim_start_matches('0');
    Some(match (d.is_empty(), negative) {
        (true, _) => "0".to_string(),
        (false, true) => format!("-{d}"),
        (false, false) => d.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Lexer: shared by the file parser and the condition parser.

/// A position in some text: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: u32,
    col: u32,
}

const START: Pos = Pos { line: 1, col: 1 };

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    LParen,
    RParen,
    Colon,
    Comma,
    Eq,
    Ne,
    /// A string literal, decoded; `verbatim` when it had no escapes, so that its characters sit
    /// at the columns following its opening quote.
    Str {
        text: String,
        verbatim: bool,
    },
    Int(i64),
    Ident(String),
    End,
}

impl Tok {
    /// How an error message names this token; `end` names the end of the text.
    fn describe(&self, end: &str) -> String {
        let s = match self {
            Tok::LBrace => "'{'",
            Tok::RBrace => "'}'",
            Tok::LBracket => "'['",
            Tok::RBracket => "']'",
            Tok::LParen => "'('",
            Tok::RParen => "')'",
            Tok::Colon => "':'",
            Tok::Comma => "','",
            Tok::Eq => "'=='",
            Tok::Ne => "'!='",
            Tok::Str { .. } => "a string",
            Tok::Int(n) => return format!("'{n}'"),
            Tok::Ident(name) => return format!("'{name}'"),
            Tok::End => end,
        };
        s.to_string()
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self, Tok::Ident(name) if name == word)
    }
}

struct LexError(Pos, String);

struct Lexer<'a> {
    src: &'a str,
    at: usize,
    pos: Pos,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer { src, at: 0, pos: START }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.at..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        if c == '\n' {
            self.pos = Pos { line: self.pos.line.saturating_add(1), col: 1 };
        } else {
            self.pos.col = self.pos.col.saturating_add(1);
        }
        Some(c)
    }

    fn next_token(&mut self) -> Result<(Pos, Tok), LexError> {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\r' | '\n' | '\x0c') => {
                    self.bump();
                }
                Some('#') => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                _ => break,
            }
        }
        let start = self.pos;
        let begin = self.at;
        let Some(c) = self.bump() else { return Ok((start, Tok::End)) };
        let tok = match c {
            '{' => Tok::LBrace,
            '}' => Tok::RBrace,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ':' => Tok::Colon,
            ',' => Tok::Comma,
            '=' | '!' if self.peek() == Some('=') => {
                self.bump();
                if c == '=' { Tok::Eq } else { Tok::Ne }
            }
            '\'' | '"' => self.string(start, c)?,
            '-' | '0'..='9' => {
                if c == '-' && !self.peek().is_some_and(|d| d.is_ascii_digit()) {
                    return Err(LexError(start, "unexpected character '-'".into()));
                }
                while self.peek().is_some_and(|d| d.is_ascii_digit()) {
                    self.bump();
                }
                let digits = &self.src[begin..self.at];
                let unsigned = digits.trim_start_matches('-');
                if unsigned.len() > 1
                    && unsigned.starts_with('0')
                    && unsigned.contains(|d| d != '0')
                {
                    let m = format!("integer {digits} has leading zeros (Python refuses them)");
                    return Err(LexError(start, m));
                }
                let n = digits
                    .parse()
                    .map_err(|_| LexError(start, format!("integer {digits} is out of range")))?;
                Tok::Int(n)
            }
            c if c == '_' || c.is_ascii_alphabetic() => {
                while self.peek().is_some_and(|d| d == '_' || d.is_ascii_alphanumeric()) {
                    self.bump();
                }
                Tok::Ident(self.src[begin..self.at].to_string())
            }
            c => return Err(LexError(start, format!("unexpected character {c:?}"))),
        };
        Ok((start, tok))
    }

    /// A string literal whose opening `quote` at `start` was just read.
    fn string(&mut self, start: Pos, quote: char) -> Result<Tok, LexError> {
        let unterminated = || LexError(start, "unterminated string".into());
        let mut text = String::new();
        let mut verbatim = true;
        loop {
            let here = self.pos;
            match self.bump() {
                None | Some('\n' | '\r') => return Err(unterminated()),
                Some(c) if c == quote => return Ok(Tok::Str { text, verbatim }),
                Some('\\') => {
                    verbatim = false;
                    let c = self.bump().ok_or_else(unterminated)?;
                    let simple = match c {
                        '\n' => continue, // a line continuation
                        '\\' | '\'' | '"' => c,
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        'a' => '\x07',
                        'b' => '\x08',
                        'f' => '\x0c',
                        'v' => '\x0b',
                        '0'..='7' => {
                            let mut v = c.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                match self.peek().and_then(|d| d.to_digit(8)) {
                                    Some(d) => {
                                        self.bump();
                                        v = v * 8 + d;
                                    }
                                    None => break,
                                }
                            }
                            char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER)
                        }
                        'x' | 'u' | 'U' => self.hex_escape(here, c)?,
                        c => {
                            let shown = c.escape_default();
                            return Err(LexError(here, format!("invalid escape '\\{shown}'")));
                        }
                    };
                    text.push(simple);
                }
                Some(c) => text.push(c),
            }
        }
    }

    /// The character of a `\x`, `\u` or `\U` escape (its backslash at `at`).
    fn hex_escape(&mut self, at: Pos, kind: char) -> Result<char, LexError> {
        let digits = match kind {
            'x' => 2,
            'u' => 4,
            _ => 8,
        };
        let mut v: u32 = 0;
        for _ in 0..digits {
            let Some(d) = self.peek().and_then(|d| d.to_digit(16)) else {
                let m = format!("invalid escape '\\{kind}' (expected {digits} hex digits)");
                return Err(LexError(at, m));
            };
            self.bump();
            v = v.saturating_mul(16).saturating_add(d);
        }
        char::from_u32(v).ok_or_else(|| {
            LexError(at, format!("invalid escape '\\{kind}' ({v:#x} is not a character)"))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Parser: a Python literal into a tree of positioned values.

#[derive(Debug, Clone)]
struct Str {
    text: String,
    verbatim: bool,
}

#[derive(Debug)]
enum Value {
    Str(Str),
    Int(i64),
    Bool(bool),
    None,
    List(Vec<Node>),
    Dict(Vec<(Key, Node)>),
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::Str(_) => "a string".into(),
            Value::Int(n) => format!("the integer {n}"),
            Value::Bool(true) => "'True'".into(),
            Value::Bool(false) => "'False'".into(),
            Value::None => "'None'".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
        }
    }
}

#[derive(Debug)]
struct Node {
    pos: Pos,
    value: Value,
}

#[derive(Debug)]
struct Key {
    pos: Pos,
    text: String,
}

fn location(file: &str, pos: Pos) -> Location {
    Location { file: file.to_string(), line: pos.line, column: pos.col }
}

/// Where `inner` (a position in the decoded text of string `s`, written at `pos`) is in the
/// file: exact when the string had no escapes, else the string's opening quote.
fn inner_location(file: &str, pos: Pos, s: &Str, inner: Pos) -> Location {
    if s.verbatim && inner.line == 1 {
        location(file, Pos { line: pos.line, col: pos.col.saturating_add(inner.col) })
    } else {
        location(file, pos)
    }
}

struct Parser<'a> {
    lex: Lexer<'a>,
    file: &'a str,
    pos: Pos,
    tok: Tok,
}

fn parse(file: &str, src: &str) -> Result<Node, IsolateError> {
    let mut p = Parser { lex: Lexer::new(src), file, pos: START, tok: Tok::End };
    p.advance()?;
    let doc = p.value(0, "a value")?;
    if p.tok != Tok::End {
        return Err(p.unexpected("end of file"));
    }
    Ok(doc)
}

impl Parser<'_> {
    fn advance(&mut self) -> Result<(), IsolateError> {
        let (pos, tok) = self.lex.next_token().map_err(|LexError(pos, message)| {
            IsolateError::Syntax { at: location(self.file, pos), message }
        })?;
        self.pos = pos;
        self.tok = tok;
        Ok(())
    }

    fn unexpected(&self, expected: &str) -> IsolateError {
        let found = self.tok.describe("end of file");
        IsolateError::Syntax {
            at: location(self.file, self.pos),
            message: format!("expected {expected} but found {found}"),
        }
    }

    /// One value, inside `depth` enclosing lists and dicts.
    fn value(&mut self, depth: usize, expected: &str) -> Result<Node, IsolateError> {
        let pos = self.pos;
        let value = match &mut self.tok {
            Tok::Str { text, verbatim } => {
                let s = Str { text: std::mem::take(text), verbatim: *verbatim };
                self.advance()?;
                Value::Str(s)
            }
            Tok::Int(n) => {
                let n = *n;
                self.advance()?;
                Value::Int(n)
            }
            Tok::Ident(name) => {
                let v = match name.as_str() {
                    "True" => Value::Bool(true),
                    "False" => Value::Bool(false),
                    "None" => Value::None,
                    _ => return Err(self.unexpected(expected)),
                };
                self.advance()?;
                v
            }
            Tok::LBracket | Tok::LBrace if depth >= MAX_NESTING => {
                return Err(IsolateError::TooDeep { at: location(self.file, pos) });
            }
            Tok::LBracket => self.list(depth + 1)?,
            Tok::LBrace => self.dict(depth + 1)?,
            _ => return Err(self.unexpected(expected)),
        };
        Ok(Node { pos, value })
    }

    fn list(&mut self, depth: usize) -> Result<Value, IsolateError> {
        self.advance()?;
        let mut items = Vec::new();
        while self.tok != Tok::RBracket {
            items.push(self.value(depth, "a value or ']'")?);
            match self.tok {
                Tok::Comma => self.advance()?,
                Tok::RBracket => {}
                _ => return Err(self.unexpected("',' or ']'")),
            }
        }
        self.advance()?;
        Ok(Value::List(items))
    }

    fn dict(&mut self, depth: usize) -> Result<Value, IsolateError> {
        self.advance()?;
        let mut entries = Vec::new();
        let mut seen = BTreeSet::new();
        while self.tok != Tok::RBrace {
            let Tok::Str { text, .. } = &mut self.tok else {
                return Err(self.unexpected("a string key or '}'"));
            };
            let key = Key { pos: self.pos, text: std::mem::take(text) };
            if !seen.insert(key.text.clone()) {
                return Err(IsolateError::Syntax {
                    at: location(self.file, key.pos),
                    message: format!("duplicate key {:?}", key.text),
                });
            }
            self.advance()?;
            if self.tok != Tok::Colon {
                return Err(self.unexpected("':'"));
            }
            self.advance()?;
            entries.push((key, self.value(depth, "a value")?));
            match self.tok {
                Tok::Comma => self.advance()?,
                Tok::RBrace => {}
                _ => return Err(self.unexpected("',' or '}'")),
            }
        }
        self.advance()?;
        Ok(Value::Dict(entries))
    }
}

// ---------------------------------------------------------------------------------------------
// Conditions: `==`, `!=`, `and`, `or`, `not`, parentheses; operands are strings, integers and
// variables. A condition is parsed once into an [`Expr`], then checked (every variable it names
// must be defined), mined for the literals its file compares each variable with, and
// evaluated.

enum CondError {
    Syntax(Pos, String),
    TooDeep(Pos),
}

#[derive(Debug)]
enum Operand {
    Literal(PyValue),
    Var { name: String, pos: Pos },
}

#[derive(Debug)]
enum Expr {
    /// `a or b or ...`
    Any(Vec<Expr>),
    /// `a and b and ...`
    All(Vec<Expr>),
    Not(Box<Expr>),
    Compare {
        equal: bool,
        lhs: Operand,
        rhs: Operand,
    },
}

/// One alternative of a condition in disjunctive form: the value each variable must have.
type Term<'e> = BTreeMap<&'e str, &'e PyValue>;

impl Expr {
    /// The variables named, in the order written.
    fn variables<'e>(&'e self, out: &mut Vec<(&'e str, Pos)>) {
        match self {
            Expr::Any(v) | Expr::All(v) => v.iter().for_each(|e| e.variables(out)),
            Expr::Not(e) => e.variables(out),
            Expr::Compare { lhs, rhs, .. } => {
                for o in [lhs, rhs] {
                    if let Operand::Var { name, pos } = o {
                        out.push((name, *pos));
                    }
                }
            }
        }
    }

    /// The comparison of one variable with one literal, either way round.
    fn var_and_literal<'e>(lhs: &'e Operand, rhs: &'e Operand) -> Option<(&'e str, &'e PyValue)> {
        match (lhs, rhs) {
            (Operand::Var { name, .. }, Operand::Literal(v))
            | (Operand::Literal(v), Operand::Var { name, .. }) => Some((name, v)),
            _ => None,
        }
    }

    /// Adds the literals each variable is compared with.
    fn literals(&self, out: &mut BTreeMap<String, BTreeSet<PyValue>>) {
        match self {
            Expr::Any(v) | Expr::All(v) => v.iter().for_each(|e| e.literals(out)),
            Expr::Not(e) => e.literals(out),
            Expr::Compare { lhs, rhs, .. } => {
                if let Some((name, v)) = Self::var_and_literal(lhs, rhs) {
                    out.entry(name.to_string()).or_default().insert(v.clone());
                }
            }
        }
    }

    /// Whether this is Chromium's own dialect: `VAR == literal` joined by `and` and `or`.
    fn is_chromium(&self) -> bool {
        match self {
            Expr::Any(v) | Expr::All(v) => v.iter().all(Expr::is_chromium),
            Expr::Not(_) => false,
            Expr::Compare { equal, lhs, rhs } => {
                *equal && Self::var_and_literal(lhs, rhs).is_some()
            }
        }
    }

    /// The value, evaluated left to right with short circuits as Python does; `None` when a
    /// variable `value` does not know is reached (Python's `NameError`).
    fn eval(&self, value: &dyn Fn(&str) -> Option<PyValue>) -> Option<bool> {
        match self {
            Expr::Any(v) => {
                for e in v {
                    if e.eval(value)? {
                        return Some(true);
                    }
                }
                Some(false)
            }
            Expr::All(v) => {
                for e in v {
                    if !e.eval(value)? {
                        return Some(false);
                    }
                }
                Some(true)
            }
            Expr::Not(e) => e.eval(value).map(|b| !b),
            Expr::Compare { equal, lhs, rhs } => {
                let get = |o: &Operand| match o {
                    Operand::Literal(v) => Some(v.clone()),
                    Operand::Var { name, .. } => value(name),
                };
                let l = get(lhs)?;
                let r = get(rhs)?;
                Some((l == r) == *equal)
            }
        }
    }

    /// Whether some values of the variables (each one its file compares the variable with)
    /// satisfy this condition of Chromium's dialect; `true` past [`MAX_CONDITION_TERMS`]
    /// comparisons or alternatives.
    fn satisfiable(&self) -> bool {
        self.comparisons() > MAX_CONDITION_TERMS || self.terms().is_none_or(|t| !t.is_empty())
    }

    fn comparisons(&self) -> usize {
        match self {
            Expr::Any(v) | Expr::All(v) => v.iter().map(Expr::comparisons).sum(),
            Expr::Not(e) => e.comparisons(),
            Expr::Compare { .. } => 1,
        }
    }

    /// The consistent alternatives of this condition of Chromium's dialect, `None` when there
    /// would be more than [`MAX_CONDITION_TERMS`].
    fn terms(&self) -> Option<Vec<Term<'_>>> {
        match self {
            Expr::Any(v) => {
                let mut out = Vec::new();
                for e in v {
                    out.extend(e.terms()?);
                    if out.len() > MAX_CONDITION_TERMS {
                        return None;
                    }
                }
                Some(out)
            }
            Expr::All(v) => {
                let mut acc: Vec<Term<'_>> = vec![Term::new()];
                for e in v {
                    let terms = e.terms()?;
                    if acc.len().saturating_mul(terms.len()) > MAX_CONDITION_TERMS {
                        return None;
                    }
                    let mut next = Vec::new();
                    for t in terms {
                        for a in &acc {
                            let consistent = t.iter().all(|(k, v)| a.get(k).is_none_or(|w| w == v));
                            if consistent {
                                let mut m = a.clone();
                                m.extend(t.iter().map(|(k, v)| (*k, *v)));
                                next.push(m);
                            }
                        }
                    }
                    acc = next;
                }
                Some(acc)
            }
            Expr::Not(_) => None,
            Expr::Compare { lhs, rhs, .. } => {
                let (name, v) = Self::var_and_literal(lhs, rhs)?;
                Some(vec![Term::from([(name, v)])])
            }
        }
    }
}

struct Cond<'a> {
    lex: Lexer<'a>,
    pos: Pos,
    tok: Tok,
}

fn parse_condition(text: &str) -> Result<Expr, CondError> {
    let mut c = Cond { lex: Lexer::new(text), pos: START, tok: Tok::End };
    c.advance()?;
    let e = c.or(0)?;
    if c.tok != Tok::End {
        return Err(c.unexpected("'and', 'or' or end of condition"));
    }
    Ok(e)
}

impl Cond<'_> {
    fn advance(&mut self) -> Result<(), CondError> {
        let (pos, tok) =
            self.lex.next_token().map_err(|LexError(pos, m)| CondError::Syntax(pos, m))?;
        self.pos = pos;
        self.tok = tok;
        Ok(())
    }

    fn unexpected(&self, expected: &str) -> CondError {
        let found = self.tok.describe("end of condition");
        CondError::Syntax(self.pos, format!("expected {expected} but found {found}"))
    }

    fn or(&mut self, depth: usize) -> Result<Expr, CondError> {
        let mut v = vec![self.and(depth)?];
        while self.tok.is_word("or") {
            self.advance()?;
            v.push(self.and(depth)?);
        }
        Ok(if v.len() == 1 { v.remove(0) } else { Expr::Any(v) })
    }

    fn and(&mut self, depth: usize) -> Result<Expr, CondError> {
        let mut v = vec![self.not(depth)?];
        while self.tok.is_word("and") {
            self.advance()?;
            v.push(self.not(depth)?);
        }
        Ok(if v.len() == 1 { v.remove(0) } else { Expr::All(v) })
    }

    fn not(&mut self, depth: usize) -> Result<Expr, CondError> {
        if depth >= MAX_NESTING {
            return Err(CondError::TooDeep(self.pos));
        }
        if self.tok.is_word("not") {
            self.advance()?;
            return Ok(Expr::Not(Box::new(self.not(depth + 1)?)));
        }
        if self.tok == Tok::LParen {
            self.advance()?;
            let v = self.or(depth + 1)?;
            if self.tok != Tok::RParen {
                return Err(self.unexpected("'and', 'or' or ')'"));
            }
            self.advance()?;
            return Ok(v);
        }
        let lhs = self.operand()?;
        let equal = match self.tok {
            Tok::Eq => true,
            Tok::Ne => false,
            _ => return Err(self.unexpected("'==' or '!='")),
        };
        self.advance()?;
        let rhs = self.operand()?;
        Ok(Expr::Compare { equal, lhs, rhs })
    }

    fn operand(&mut self) -> Result<Operand, CondError> {
        let v = match &self.tok {
            Tok::Str { text, .. } => Operand::Literal(PyValue::Str(text.clone())),
            Tok::Int(n) => Operand::Literal(PyValue::Int(n.to_string())),
            Tok::Ident(name) if !matches!(name.as_str(), "and" | "or" | "not") => {
                Operand::Var { name: name.clone(), pos: self.pos }
            }
            _ => return Err(self.unexpected("a variable, string or integer")),
        };
        self.advance()?;
        Ok(v)
    }
}

// ---------------------------------------------------------------------------------------------
// Paths, lexically.

/// Folds empty and `.` components and `x/..`; keeps leading `..` on a relative path and drops
/// them on an absolute one. The empty relative path stays empty.
fn normalize(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if absolute => {}
                _ => parts.push(".."),
            },
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    if absolute { format!("/{joined}") } else { joined }
}

/// The directory part of a normalized path: `""` for a bare name, `/` for a name in `/`.
fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

fn join(dir: &str, path: &str) -> String {
    if dir.is_empty() { path.to_string() } else { format!("{dir}/{path}") }
}

/// `path` relative to `base`, both normalized and both relative or both absolute; `""` is
/// `base` itself. `None` when `base` climbs with `..` above where `path` does, so the answer
/// needs the names of directories neither says.
fn relative_to(path: &str, base: &str) -> Option<String> {
    let p: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let b: Vec<&str> = base.split('/').filter(|c| !c.is_empty()).collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if b[common..].contains(&"..") {
        return None;
    }
    let mut out = vec![".."; b.len() - common];
    out.extend(&p[common..]);
    Some(out.join("/"))
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

/// The names under which files written before October 2014 list their paths: Chromium read
/// them all as `files`.
const LEGACY_FILE_KEYS: [&str; 3] =
    ["isolate_dependency_tracked", "isolate_dependency_untracked", "isolate_dependency_touched"];

/// A command as written: substituted only if it wins.
#[derive(Debug)]
struct PendingCommand {
    file: String,
    args: Vec<(Pos, Str)>,
}

/// What one `variables` dict says besides its files (which are added as it is read).
#[derive(Debug, Default)]
struct Settings {
    lists_files: bool,
    /// Whether it gives a non-empty command, applied or not.
    has_command: bool,
    /// The command, when the dict applies.
    command: Option<PendingCommand>,
    read_only: Option<u8>,
}

/// A `variables` dict that applies, ranked as Chromium ranked it.
#[derive(Debug)]
struct Block {
    /// The variables its condition was matched with, sorted; none for a file's global dict.
    key: Rc<[String]>,
    /// Its file's directory, in the loader's terms.
    dir: String,
    lists_files: bool,
    command: Option<PendingCommand>,
    read_only: Option<u8>,
}

impl Block {
    fn new(key: Rc<[String]>, dir: &str, s: Settings) -> Block {
        let Settings { lists_files, command, read_only, .. } = s;
        Block { key, dir: dir.to_string(), lists_files, command, read_only }
    }
}

struct Evaluator<'a> {
    vars: &'a BTreeMap<String, String>,
    /// `vars` as Python compares them.
    typed: BTreeMap<String, PyValue>,
    load: &'a mut dyn FnMut(&str) -> Result<String, String>,
    /// The root file's directory, in the loader's terms.
    root_dir: String,
    /// The absolute directory relative loader paths are relative to, when known.
    base: Option<String>,
    /// Parsed files by path: a file included twice is loaded once.
    parsed: BTreeMap<String, Rc<Node>>,
    /// The files being evaluated, outermost first.
    stack: Vec<String>,
    evaluations: usize,
    expanded: usize,
    /// Path relative to `root_dir` -> is a directory.
    files: BTreeMap<String, bool>,
    /// See [`Isolate::variable_dirs`].
    variable_dirs: BTreeSet<String>,
}

fn shape(file: &str, pos: Pos, message: String) -> IsolateError {
    IsolateError::Shape { at: location(file, pos), message }
}

/// The entries of `node`, which `what` says must be a dict.
fn as_dict<'n>(file: &str, node: &'n Node, what: &str) -> Result<&'n [(Key, Node)], IsolateError> {
    match &node.value {
        Value::Dict(entries) => Ok(entries),
        v => Err(shape(file, node.pos, format!("{what}; found {}", v.describe()))),
    }
}

/// The items of `node`, which `what` says must be a list.
fn as_list<'n>(file: &str, node: &'n Node, what: &str) -> Result<&'n [Node], IsolateError> {
    match &node.value {
        Value::List(items) => Ok(items),
        v => Err(shape(file, node.pos, format!("{what}; found {}", v.describe()))),
    }
}

/// The strings of the list under `key`, which must hold only strings.
fn strings<'n>(file: &str, key: &str, node: &'n Node) -> Result<Vec<(Pos, &'n Str)>, IsolateError> {
    as_list(file, node, &format!("'{key}' must be a list of strings"))?
        .iter()
        .map(|n| match &n.value {
            Value::Str(s) => Ok((n.pos, s)),
            v => {
                let found = v.describe();
                Err(shape(file, n.pos, format!("'{key}' must hold only strings; found {found}")))
            }
        })
        .collect()
}

/// A `read_only` value: 0, 1, 2, or `None` for none; `True` and `False` count as 1 and 0, as
/// they do in Python.
fn read_only(file: &str, node: &Node) -> Result<Option<u8>, IsolateError> {
    match &node.value {
        Value::Int(n @ 0..=2) => Ok(u8::try_from(*n).ok()),
        Value::Bool(b) => Ok(Some(u8::from(*b))),
        Value::None => Ok(None),
        v => {
            let m = format!("'read_only' must be 0, 1, 2 or None; found {}", v.describe());
            Err(shape(file, node.pos, m))
        }
    }
}

/// A parsed condition and its branches.
struct Condition<'n> {
    expr: Expr,
    then: &'n Node,
    otherwise: Option<&'n Node>,
}

impl Evaluator<'_> {
    /// Evaluates the file at `path` (normalized), included from `from` unless it is the root:
    /// the `variables` dicts that apply, in Chromium's order for dicts of the same rank.
    fn file(&mut self, path: &str, from: Option<&Location>) -> Result<Vec<Block>, IsolateError> {
        self.evaluations += 1;
        if let Some(at) = from {
            if let Some(i) = self.stack.iter().position(|p| p == path) {
                let mut chain = self.stack[i..].to_vec();
                chain.push(path.to_string());
                return Err(IsolateError::IncludeCycle { at: at.clone(), chain });
            }
            if self.stack.len() >= MAX_INCLUDE_DEPTH {
                return Err(IsolateError::IncludeDepth { at: at.clone() });
            }
            if self.evaluations > MAX_INCLUDED_FILES {
                return Err(IsolateError::TooManyIncludes { at: at.clone() });
            }
        }
        let doc = match self.parsed.get(path) {
            Some(doc) => Rc::clone(doc),
            None => {
                let text = (self.load)(path).map_err(|message| match from {
                    None => IsolateError::LoadRoot { path: path.to_string(), message },
                    Some(at) => IsolateError::LoadInclude {
                        at: at.clone(),
                        path: path.to_string(),
                        message,
                    },
                })?;
                if text.len() > MAX_ISOLATE_BYTES {
                    return Err(IsolateError::TooLarge {
                        file: path.to_string(),
                        size: text.len(),
                    });
                }
                let doc = Rc::new(parse(path, &text)?);
                self.parsed.insert(path.to_string(), Rc::clone(&doc));
                doc
            }
        };
        self.stack.push(path.to_string());
        let blocks = self.root(path, parent(path), &doc)?;
        self.stack.pop();
        Ok(blocks)
    }

    /// The top-level dict of `file`, whose directory is `dir`: its global dict, its
    /// conditions' dicts that apply, then its includes' from the last include to the first, as
    /// Chromium merged them. When the file gives a command anywhere, its includes' are dropped.
    fn root(&mut self, file: &str, dir: &str, doc: &Node) -> Result<Vec<Block>, IsolateError> {
        let entries = as_dict(file, doc, "expected a dict at the top level")?;
        let (mut includes, mut variables, mut conditions) = (None, None, None);
        for (key, value) in entries {
            let slot = match key.text.as_str() {
                "includes" => &mut includes,
                "variables" => &mut variables,
                "conditions" => &mut conditions,
                other => {
                    let m = format!(
                        "unknown key {other:?}; expected 'includes', 'variables' or 'conditions'"
                    );
                    return Err(shape(file, key.pos, m));
                }
            };
            *slot = Some(value);
        }
        let mut included = Vec::new();
        if let Some(node) = includes {
            for (pos, s) in strings(file, "includes", node)? {
                let at = location(file, pos);
                let bad =
                    |reason| IsolateError::BadPath { at: at.clone(), path: s.text.clone(), reason };
                if s.text.is_empty() {
                    return Err(bad("empty path"));
                }
                if s.text.starts_with('/') {
                    return Err(bad("absolute include path"));
                }
                included.push((normalize(&join(dir, &s.text)), at));
            }
        }
        let global = match variables {
            Some(node) => self.variables(file, dir, node, true)?,
            None => Settings::default(),
        };
        let mut has_command = global.has_command;
        let mut blocks = vec![Block::new(Rc::from([]), dir, global)];
        if let Some(node) = conditions {
            has_command |= self.conditions(file, dir, node, &mut blocks)?;
        }
        for (path, at) in included.iter().rev() {
            let mut theirs = self.file(path, Some(at))?;
            if has_command {
                theirs.iter_mut().for_each(|b| b.command = None);
            }
            blocks.extend(theirs);
        }
        Ok(blocks)
    }

    /// A `variables` dict. Its shape is always checked; its files are added when `apply`.
    fn variables(
        &mut self,
        file: &str,
        dir: &str,
        node: &Node,
        apply: bool,
    ) -> Result<Settings, IsolateError> {
        let entries = as_dict(file, node, "'variables' must be a dict")?;
        let mut s = Settings::default();
        for (key, value) in entries {
            match key.text.as_str() {
                k if k == "files" || LEGACY_FILE_KEYS.contains(&k) => {
                    let items = strings(file, k, value)?;
                    s.lists_files |= !items.is_empty();
                    if apply {
                        for (pos, item) in items {
                            self.add_file(file, dir, pos, item)?;
                        }
                    }
                }
                "command" => {
                    let items = strings(file, "command", value)?;
                    s.has_command = !items.is_empty();
                    if apply && s.has_command {
                        let args = items.into_iter().map(|(p, a)| (p, a.clone())).collect();
                        s.command = Some(PendingCommand { file: file.to_string(), args });
                    }
                }
                "read_only" => s.read_only = read_only(file, value)?,
                other => {
                    let m = format!(
                        "unknown key {other:?} in 'variables'; expected 'files', 'command', \
                         'read_only' or one of {}",
                        LEGACY_FILE_KEYS.map(|k| format!("'{k}'")).join(", ")
                    );
                    return Err(shape(file, key.pos, m));
                }
            }
        }
        Ok(s)
    }

    /// The `conditions` of `file`: adds the dicts that apply to `blocks`, and says whether one
    /// of them gives a command that counts as the file's.
    fn conditions(
        &mut self,
        file: &str,
        dir: &str,
        node: &Node,
        blocks: &mut Vec<Block>,
    ) -> Result<bool, IsolateError> {
        let mut parsed = Vec::new();
        for c in as_list(file, node, "'conditions' must be a list")? {
            let bad = || {
                let m = "a condition must be [expression, dict] or [expression, dict, dict]";
                shape(file, c.pos, m.to_string())
            };
            let Value::List(parts) = &c.value else { return Err(bad()) };
            let (expr_node, then, otherwise) = match parts.as_slice() {
                [e, t] => (e, t, None),
                [e, t, o] => (e, t, Some(o)),
                _ => return Err(bad()),
            };
            let Value::Str(text) = &expr_node.value else {
                let found = expr_node.value.describe();
                let m = format!("a condition's expression must be a string; found {found}");
                return Err(shape(file, expr_node.pos, m));
            };
            let at = |p| inner_location(file, expr_node.pos, text, p);
            let expr = parse_condition(&text.text).map_err(|e| match e {
                CondError::Syntax(p, message) => IsolateError::Condition { at: at(p), message },
                CondError::TooDeep(p) => IsolateError::TooDeep { at: at(p) },
            })?;
            let mut named = Vec::new();
            expr.variables(&mut named);
            if let Some((name, p)) = named.into_iter().find(|(n, _)| !self.vars.contains_key(*n)) {
                return Err(IsolateError::UndefinedVariable { at: at(p), name: name.into() });
            }
            parsed.push(Condition { expr, then, otherwise });
        }
        // Chromium knew a variable only with the values its file compares it with: the others
        // are unknown, and the file's dicts rank by the variables known.
        let mut literals = BTreeMap::new();
        parsed.iter().for_each(|c| c.expr.literals(&mut literals));
        let key: Rc<[String]> = literals
            .into_iter()
            .filter(|(name, seen)| self.typed.get(name).is_some_and(|v| seen.contains(v)))
            .map(|(name, _)| name)
            .collect();
        let mut has_command = false;
        for c in &parsed {
            // Chromium's own dialect is evaluated as Chromium did; grid's additions plainly.
            let chromium = c.otherwise.is_none() && c.expr.is_chromium();
            let holds = if chromium {
                let known = |name: &str| {
                    key.iter().any(|k| k == name).then(|| self.typed.get(name).cloned()).flatten()
                };
                c.expr.eval(&known) == Some(true)
            } else {
                c.expr.eval(&|name: &str| self.typed.get(name).cloned()) == Some(true)
            };
            let s = self.branch(file, dir, c.then, holds)?;
            has_command |= s.has_command && (!chromium || c.expr.satisfiable());
            if holds {
                blocks.push(Block::new(Rc::clone(&key), dir, s));
            }
            if let Some(o) = c.otherwise {
                let s = self.branch(file, dir, o, !holds)?;
                has_command |= s.has_command;
                if !holds {
                    blocks.push(Block::new(Rc::clone(&key), dir, s));
                }
            }
        }
        Ok(has_command)
    }

    fn branch(
        &mut self,
        file: &str,
        dir: &str,
        node: &Node,
        apply: bool,
    ) -> Result<Settings, IsolateError> {
        let mut s = Settings::default();
        for (key, value) in as_dict(file, node, "a condition's branch must be a dict")? {
            if key.text != "variables" {
                let m = format!("unknown key {:?} in a condition; expected 'variables'", key.text);
                return Err(shape(file, key.pos, m));
            }
            s = self.variables(file, dir, value, apply)?;
        }
        Ok(s)
    }

    /// `path` relative to `base`, through the absolute base directory when `base` climbs
    /// above `path`.
    fn relative(&self, path: &str, base: &str) -> Option<String> {
        relative_to(path, base).or_else(|| {
            let anchor = self.base.as_deref()?;
            let abs = |p: &str| {
                if p.starts_with('/') { p.to_string() } else { normalize(&join(anchor, p)) }
            };
            relative_to(&abs(path), &abs(base))
        })
    }

    /// A directory (derived from the root's by joins) relative to the root file's directory,
    /// `.` for that directory itself.
    fn relative_dir(&self, dir: &str) -> String {
        match self.relative(dir, &self.root_dir) {
            Some(d) if d.is_empty() => ".".to_string(),
            Some(d) => d,
            None => dir.to_string(),
        }
    }

    /// One entry of a `files` list written at `pos` in `file`, whose directory is `dir`.
    fn add_file(&mut self, file: &str, dir: &str, pos: Pos, s: &Str) -> Result<(), IsolateError> {
        let raw = self.substitute(file, pos, s, None)?;
        let at = location(file, pos);
        let bad = |reason| IsolateError::BadPath { at: at.clone(), path: raw.clone(), reason };
        if raw.is_empty() {
            return Err(bad("empty path"));
        }
        if raw.starts_with('/') {
            return Err(bad("absolute path"));
        }
        if raw.contains('\0') {
            return Err(bad("NUL byte in path"));
        }
        if raw.contains('\\') {
            return Err(bad("backslash in path (separators are '/')"));
        }
        let is_dir = raw.ends_with('/');
        if !is_dir && matches!(raw.rsplit('/').next(), Some("." | "..")) {
            return Err(bad("names a directory but does not end in '/'"));
        }
        // Chromium never rebased a path starting with a variable: its value is relative to the
        // root file's directory whichever file lists it.
        let base = if s.text.starts_with("<(") { self.root_dir.as_str() } else { dir };
        let full = normalize(&join(base, &raw));
        let path = self.relative_dir(&full);
        if path.len() > MAX_PATH_BYTES {
            return Err(bad("path longer than 4096 bytes"));
        }
        match self.files.get(&path) {
            Some(&was_dir) if was_dir != is_dir => {
                Err(bad("listed both as a file and as a directory (ending in '/')"))
            }
            Some(_) => Ok(()),
            None if self.files.len() >= MAX_FILE_ENTRIES => {
                Err(IsolateError::TooManyFiles { at: at.clone() })
            }
            None => {
                self.files.insert(path, is_dir);
                Ok(())
            }
        }
    }

    /// `s` (written at `pos` in `file`) with every `<(NAME)` replaced by its value. In a
    /// command that runs from `command_dir`, a `<(NAME)` that starts the argument is a path
    /// relative to the root file's directory, re-expressed relative to `command_dir`.
    fn substitute(
        &mut self,
        file: &str,
        pos: Pos,
        s: &Str,
        command_dir: Option<&str>,
    ) -> Result<String, IsolateError> {
        let text = s.text.as_str();
        let at = |offset: usize| {
            let col = u32::try_from(text[..offset].chars().count()).unwrap_or(u32::MAX);
            inner_location(file, pos, s, Pos { line: 1, col: col.saturating_add(1) })
        };
        let mut out = String::new();
        let mut rest = 0;
        while let Some(i) = text[rest..].find("<(") {
            let start = rest + i;
            out.push_str(&text[rest..start]);
            let name_start = start + 2;
            let Some(len) = text[name_start..].find(')') else {
                let message = "unterminated variable reference '<('".to_string();
                return Err(IsolateError::Syntax { at: at(start), message });
            };
            let name = &text[name_start..name_start + len];
            if !is_identifier(name) {
                let message = format!("bad variable name {name:?} in '<(...)'");
                return Err(IsolateError::Syntax { at: at(start), message });
            }
            let Some(value) = self.vars.get(name) else {
                return Err(IsolateError::UndefinedVariable { at: at(start), name: name.into() });
            };
            if start == 0 && !value.starts_with('/') {
                let dir = self.relative_dir(&normalize(&join(&self.root_dir, value)));
                self.variable_dirs.insert(dir);
            }
            let rebased;
            let value = match command_dir {
                Some(d) if start == 0 && d != self.root_dir && !value.starts_with('/') => {
                    let full = normalize(&join(&self.root_dir, value));
                    rebased = self.relative(&full, d).ok_or_else(|| IsolateError::BadPath {
                        at: at(start),
                        path: value.clone(),
                        reason: "cannot be re-expressed relative to the command's directory \
                                 without the current directory's absolute path",
                    })?;
                    if rebased.is_empty() { "." } else { rebased.as_str() }
                }
                _ => value.as_str(),
            };
            if self.expanded + out.len() + value.len() > MAX_EXPANDED_BYTES {
                return Err(IsolateError::TooMuchExpansion { at: at(start) });
            }
            out.push_str(value);
            rest = name_start + len + 1;
        }
        out.push_str(&text[rest..]);
        self.expanded += out.len();
        if self.expanded > MAX_EXPANDED_BYTES {
            return Err(IsolateError::TooMuchExpansion { at: location(file, pos) });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Evaluates `root` over in-memory `files`, recording each path the loader is asked for.
    fn run_logged(
        files: &[(&str, &str)],
        root: &str,
        v: &[(&str, &str)],
    ) -> (Result<Isolate, IsolateError>, Vec<String>) {
        let mut asked = Vec::new();
        let mut load = |p: &str| {
            asked.push(p.to_string());
            files
                .iter()
                .find(|(name, _)| *name == p)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| "no such file".to_string())
        };
        let result = evaluate(root, &vars(v), &mut load);
        (result, asked)
    }

    fn run(
        files: &[(&str, &str)],
        root: &str,
        v: &[(&str, &str)],
    ) -> Result<Isolate, IsolateError> {
        run_logged(files, root, v).0
    }

    fn one(src: &str) -> Result<Isolate, IsolateError> {
        run(&[("t.isolate", src)], "t.isolate", &[("OS", "linux"), ("asan", "1")])
    }

    fn err(src: &str) -> String {
        match one(src) {
            Ok(i) => panic!("expected an error, got {i:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Entries as strings, directories with a trailing '/'.
    fn listed(i: &Isolate) -> Vec<String> {
        i.files.iter().map(|f| format!("{}{}", f.path, if f.is_dir { "/" } else { "" })).collect()
    }

    const BASE_UNITTESTS: &str = r#"# Copyright (c) 2013 The Chromium Authors. All rights reserved.
# Runtime dependencies of base_unittests.
{
  'variables': {
    'command': [
      '<(PRODUCT_DIR)/base_unittests<(EXECUTABLE_SUFFIX)',
    ],
    'files': [
      '<(PRODUCT_DIR)/base_unittests<(EXECUTABLE_SUFFIX)',
      'test/data/',  # the whole directory
      "../../testing/test_env.py",
    ],
    'read_only': 1,
  },
  'conditions': [
    ['OS=="linux" and asan==1', {
      'variables': {
        'files': [
          '../../third_party/llvm-build/Release+Asserts/lib/libclang_rt.asan.so',
          '<(PRODUCT_DIR)/lib/libbase.so',
        ],
      },
    }],
    ['OS=="win"', {
      'variables': {
        'command': ['<(PRODUCT_DIR)/base_unittests.exe', '--win'],
        'files': ['<(PRODUCT_DIR)/base.dll', 'test/data/win/'],
      },
    }, {
      # else: every other OS
      'variables': {
        'files': ['<(PRODUCT_DIR)/libbase_shared.so',],
      },
    }],
    ['OS!="win" and not (asan==1 or msan==1)', {
      'variables': {'files': ['test/plain.txt']},
    }],
  ],
}
"#;

    fn base_unittests(os: &str, asan: &str, suffix: &str) -> Isolate {
        let v = [
            ("OS", os),
            ("asan", asan),
            ("msan", "0"),
            ("PRODUCT_DIR", "../out/Release"),
            ("EXECUTABLE_SUFFIX", suffix),
        ];
        run(&[("base/base_unittests.isolate", BASE_UNITTESTS)], "base/base_unittests.isolate", &v)
            .unwrap()
    }

    #[test]
    fn chromium_file_evaluates_per_configuration() {
        let linux = base_unittests("linux", "1", "");
        assert_eq!(
            listed(&linux),
            [
                "../../testing/test_env.py",
                "../../third_party/llvm-build/Release+Asserts/lib/libclang_rt.asan.so",
                "../out/Release/base_unittests",
                "../out/Release/lib/libbase.so",
                "../out/Release/libbase_shared.so",
                "test/data/",
            ]
        );
        let cmd = linux.command.unwrap();
        assert_eq!(cmd.args, ["../out/Release/base_unittests"]);
        assert_eq!(cmd.relative_cwd, ".");

        let win = base_unittests("win", "0", ".exe");
        assert_eq!(
            listed(&win),
            [
                "../../testing/test_env.py",
                "../out/Release/base.dll",
                "../out/Release/base_unittests.exe",
                "test/data/",
                "test/data/win/",
            ]
        );
        // A condition's command ranks before its file's global one.
        assert_eq!(win.command.unwrap().args, ["../out/Release/base_unittests.exe", "--win"]);

        let mac = base_unittests("mac", "0", "");
        assert_eq!(
            listed(&mac),
            [
                "../../testing/test_env.py",
                "../out/Release/base_unittests",
                "../out/Release/libbase_shared.so",
                "test/data/",
                "test/plain.txt",
            ]
        );
    }

    #[test]
    fn variables_are_substituted_and_unknown_ones_named_with_their_place() {
        let src = "{'variables': {'files': ['<(PRODUCT_DIR)/t<(SUFFIX)', 'a/<(X)/b']}}";
        let v = [("PRODUCT_DIR", "out/Debug"), ("SUFFIX", ".exe"), ("X", "x")];
        let i = run(&[("t.isolate", src)], "t.isolate", &v).unwrap();
        assert_eq!(listed(&i), ["a/x/b", "out/Debug/t.exe"]);

        let src = "{\n  'variables': {\n    'files': ['<(PRODUCT_DIR)/x<(EXE)'],\n  },\n}\n";
        let e = run(&[("t.isolate", src)], "t.isolate", &[("PRODUCT_DIR", "out")]).unwrap_err();
        assert_eq!(e.to_string(), r#"t.isolate:3:32: undefined variable "EXE""#);
        // With an escape in the string, columns inside it are unknown: the string is named.
        let src = "{'variables': {'files': ['\\x41/<(EXE)']}}";
        assert_eq!(err(src), r#"t.isolate:1:26: undefined variable "EXE""#);
        assert_eq!(
            err("{'variables': {'files': ['a/<(EXE']}}"),
            "t.isolate:1:29: unterminated variable reference '<('"
        );
        assert_eq!(
            err("{'variables': {'files': ['<(!ls)']}}"),
            r#"t.isolate:1:27: bad variable name "!ls" in '<(...)'"#
        );
        // A variable only used in a branch not taken need not be defined.
        let src = "{'conditions': [['OS==\"win\"', {'variables': {'files': ['<(EXE)']}}]]}";
        assert!(one(src).unwrap().files.is_empty());
    }

    #[test]
    fn syntax_errors_name_line_column_and_expectation() {
        for (src, want) in [
            ("{\n  'variables': {'files': ['a.txt]}}\n", "t.isolate:2:27: unterminated string"),
            ("{'variables': {'files': ['a\\qb']}}", r"t.isolate:1:28: invalid escape '\q'"),
            (
                "{'variables': {'files': ['a\\x4g']}}",
                r"t.isolate:1:28: invalid escape '\x' (expected 2 hex digits)",
            ),
            (
                "{\n  'variables': {\n    'files': ['a'],\n    'command': ['b']\n    'read_only': 1,\n  },\n}\n",
                "t.isolate:5:5: expected ',' or '}' but found a string",
            ),
            (
                "{'variables': {'files': ['a' 'b']}}",
                "t.isolate:1:30: expected ',' or ']' but found a string",
            ),
            (
                "{'variables': {'files': ['a', 'b'}}",
                "t.isolate:1:34: expected ',' or ']' but found '}'",
            ),
            (
                "{'variables': {'files': ['a']}\n",
                "t.isolate:2:1: expected ',' or '}' but found end of file",
            ),
            ("{}}", "t.isolate:1:3: expected end of file but found '}'"),
            ("{'a': [,]}", "t.isolate:1:8: expected a value or ']' but found ','"),
            ("{'a' 1}", "t.isolate:1:6: expected ':' but found '1'"),
            ("{1: 2}", "t.isolate:1:2: expected a string key or '}' but found '1'"),
            ("{'a': foo}", "t.isolate:1:7: expected a value but found 'foo'"),
            ("{'a': (1,)}", "t.isolate:1:7: expected a value but found '('"),
            ("{'a': 1, 'a': 2}", r#"t.isolate:1:10: duplicate key "a""#),
            ("{'a': @}", "t.isolate:1:7: unexpected character '@'"),
            ("", "t.isolate:1:1: expected a value but found end of file"),
        ] {
            assert_eq!(err(src), want, "{src:?}");
        }
    }

    #[test]
    fn literal_syntax_accepts_python_forms() {
        let src = "\t# comment\r\n{ \"variables\" : {'files':['a\\'b', \"c\\\"d\", \
                   'tab\\tx', 'oct\\101', 'hex\\x42', 'uni\\u00e9', 'long\\U0001F600', 'cont\\\nd',],\
                   'command': ['e\\\\f', 'nl\\n'], 'read_only':None,},}  # done";
        let i = one(src).unwrap();
        let got: Vec<&str> = i.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            got,
            ["a'b", "c\"d", "contd", "hexB", "long\u{1F600}", "octA", "tab\tx", "uni\u{e9}"]
        );
        assert_eq!(i.command.unwrap().args, ["e\\f", "nl\n"]);
        // A backslash in a path is refused: separators are '/'.
        let e = one("{'variables': {'files': ['a\\\\b']}}").unwrap_err();
        assert!(matches!(e, IsolateError::BadPath { .. }), "{e}");
        // Other literals parse, wherever an .isolate file may not use them.
        assert!(parse("t", "[True, False, None, -3, 0, 00, {}, [], {'k': (1)}]").is_err());
        assert!(parse("t", "[True, False, None, -3, 0, 00, {}, []]").is_ok());
        // Python 3 refuses leading zeros in an integer literal.
        let e = parse("t", "[007]").unwrap_err();
        assert_eq!(e.to_string(), "t:1:2: integer 007 has leading zeros (Python refuses them)");
    }

    #[test]
    fn shapes_are_checked_with_their_place() {
        for (src, want) in [
            ("[]", "t.isolate:1:1: expected a dict at the top level; found a list"),
            (
                "{'condition': []}",
                r#"t.isolate:1:2: unknown key "condition"; expected 'includes', 'variables' or 'conditions'"#,
            ),
            ("{'variables': []}", "t.isolate:1:15: 'variables' must be a dict; found a list"),
            (
                "{'variables': {'files': 'a'}}",
                "t.isolate:1:25: 'files' must be a list of strings; found a string",
            ),
            (
                "{'variables': {'files': ['a', 1]}}",
                "t.isolate:1:31: 'files' must hold only strings; found the integer 1",
            ),
            (
                "{'variables': {'command': [None]}}",
                "t.isolate:1:28: 'command' must hold only strings; found 'None'",
            ),
            (
                "{'conditions': [['OS==\"linux\"']]}",
                "t.isolate:1:17: a condition must be [expression, dict] or [expression, dict, dict]",
            ),
            (
                "{'conditions': [['OS==\"linux\"', {}, {}, {}]]}",
                "t.isolate:1:17: a condition must be [expression, dict] or [expression, dict, dict]",
            ),
            (
                "{'conditions': [[1, {}]]}",
                "t.isolate:1:18: a condition's expression must be a string; found the integer 1",
            ),
            (
                "{'conditions': [['OS==\"linux\"', []]]}",
                "t.isolate:1:33: a condition's branch must be a dict; found a list",
            ),
            (
                "{'conditions': [['OS==\"linux\"', {'includes': []}]]}",
                r#"t.isolate:1:34: unknown key "includes" in a condition; expected 'variables'"#,
            ),
            // The branch not taken is checked too, so a typo fails on every platform.
            (
                "{'conditions': [['OS==\"win\"', {'variables': {'files': 'x'}}]]}",
                "t.isolate:1:55: 'files' must be a list of strings; found a string",
            ),
            (
                "{'includes': ['/abs.isolate']}",
                r#"t.isolate:1:15: path "/abs.isolate": absolute include path"#,
            ),
        ] {
            assert_eq!(err(src), want, "{src:?}");
        }
        // Chromium refused any other key under 'variables', and so does grid.
        assert_eq!(
            err("{'variables': {'files': [], 'isolate_dependency_tracke': ['x']}}"),
            "t.isolate:1:29: unknown key \"isolate_dependency_tracke\" in 'variables'; expected \
             'files', 'command', 'read_only' or one of 'isolate_dependency_tracked', \
             'isolate_dependency_untracked', 'isolate_dependency_touched'"
        );
        for (src, want) in [
            (
                "{'variables': {'isolate_dependency_untracked': 'data/'}}",
                "t.isolate:1:48: 'isolate_dependency_untracked' must be a list of strings; found a string",
            ),
            (
                "{'variables': {'read_only': 3}}",
                "t.isolate:1:29: 'read_only' must be 0, 1, 2 or None; found the integer 3",
            ),
            (
                "{'variables': {'read_only': '1'}}",
                "t.isolate:1:29: 'read_only' must be 0, 1, 2 or None; found a string",
            ),
            // Checked in a branch not taken too.
            (
                "{'conditions': [['OS==\"win\"', {'variables': {'read_only': -1}}]]}",
                "t.isolate:1:59: 'read_only' must be 0, 1, 2 or None; found the integer -1",
            ),
        ] {
            assert_eq!(err(src), want, "{src:?}");
        }
    }

    fn cond(expr: &str) -> Result<bool, IsolateError> {
        let src = format!(
            "{{'conditions': [[{expr:?}, {{'variables': {{'files': ['yes']}}}}, \
             {{'variables': {{'files': ['no']}}}}]]}}"
        );
        let v = [("OS", "linux"), ("asan", "1"), ("n", "01")];
        let i = run(&[("t.isolate", &src)], "t.isolate", &v)?;
        assert_eq!(i.files.len(), 1, "exactly one branch is taken");
        Ok(i.files[0].path == "yes")
    }

    #[test]
    fn conditions_evaluate_gyp_expressions() {
        for (expr, want) in [
            ("OS==\"linux\"", true),
            ("OS=='linux'", true),
            ("\"linux\"==OS", true),
            ("OS!=\"linux\"", false),
            ("asan==1", true),
            // As in Python: a value that is integer text is an integer, and an integer never
            // equals a string.
            ("asan=='1'", false),
            ("asan!=1", false),
            ("asan!='1'", true),
            ("n==1", true),
            ("n=='01'", false),
            ("n=='1'", false),
            ("n==-1", false),
            ("OS==1", false),
            ("1==1", true),
            ("-1==-1", true),
            ("not OS==\"win\"", true),
            ("not not OS==\"win\"", false),
            ("OS==\"win\" or asan==1 and OS==\"linux\"", true),
            ("OS==\"linux\" or asan==1 and OS==\"win\"", true),
            ("(OS==\"linux\" or asan==1) and OS==\"win\"", false),
            ("(OS==\"win\" or asan==1) and not (OS==\"linux\")", false),
            ("((OS==\"linux\"))", true),
        ] {
            assert_eq!(cond(expr).unwrap(), want, "{expr}");
        }
    }

    #[test]
    fn condition_errors_point_into_the_expression() {
        let src = "{\n  'conditions': [\n    ['OS==\"linux\" and asan==1', {'variables': {}}],\n  ],\n}\n";
        let e = run(&[("t.isolate", src)], "t.isolate", &[("OS", "linux")]).unwrap_err();
        assert_eq!(e.to_string(), r#"t.isolate:3:23: undefined variable "asan""#);
        // Every variable must be defined, even one a short-circuit would skip.
        let src = "{'conditions': [['OS==\"win\" and msvs==2013', {}]]}";
        assert_eq!(err(src), r#"t.isolate:1:33: undefined variable "msvs""#);
        for (src, want) in [
            (
                "{'conditions': [['OS==\"linux\" and', {}]]}",
                "t.isolate:1:34: bad condition: expected a variable, string or integer but found end of condition",
            ),
            (
                "{'conditions': [['OS=\"linux\"', {}]]}",
                "t.isolate:1:21: bad condition: unexpected character '='",
            ),
            (
                "{'conditions': [['OS', {}]]}",
                "t.isolate:1:21: bad condition: expected '==' or '!=' but found end of condition",
            ),
            (
                "{'conditions': [['(OS==\"x\"', {}]]}",
                "t.isolate:1:27: bad condition: expected 'and', 'or' or ')' but found end of condition",
            ),
            (
                "{'conditions': [['OS==\"x\" asan', {}]]}",
                "t.isolate:1:27: bad condition: expected 'and', 'or' or end of condition but found 'asan'",
            ),
            (
                "{'conditions': [['OS==and', {}]]}",
                "t.isolate:1:23: bad condition: expected a variable, string or integer but found 'and'",
            ),
        ] {
            assert_eq!(err(src), want, "{src:?}");
        }
    }

    #[test]
    fn includes_resolve_across_directories() {
        let files = [
            (
                "out/a.isolate",
                "{\n  'includes': ['../common/b.isolate'],\n  \
                 'variables': {'files': ['run.sh', 'gen/x.txt']},\n}",
            ),
            (
                "common/b.isolate",
                "{'includes': ['sub/c.isolate'], 'variables': {\
                 'files': ['data/', '<(PRODUCT_DIR)/lib.so'], 'command': ['python', 'b.py']}}",
            ),
            (
                "common/sub/c.isolate",
                "{'variables': {'files': ['../../out/gen/x.txt', 'c.txt', './']}}",
            ),
        ];
        let (result, asked) = run_logged(&files, "out/a.isolate", &[("PRODUCT_DIR", "Release")]);
        let i = result.unwrap();
        assert_eq!(asked, ["out/a.isolate", "common/b.isolate", "common/sub/c.isolate"]);
        assert_eq!(
            listed(&i),
            [
                "../common/data/",
                "../common/sub/",
                "../common/sub/c.txt",
                // A path starting with a variable is relative to the root, not to b.isolate.
                "Release/lib.so",
                // Listed by a.isolate and, as ../../out/gen/x.txt, by c.isolate: one entry.
                "gen/x.txt",
                "run.sh",
            ]
        );
        let cmd = i.command.unwrap();
        assert_eq!(cmd.args, ["python", "b.py"]);
        assert_eq!(cmd.relative_cwd, "../common");

        // An absolute root keeps absolute loader paths.
        let abs: Vec<(String, &str)> =
            files.iter().map(|(p, t)| (format!("/src/{p}"), *t)).collect();
        let abs: Vec<(&str, &str)> = abs.iter().map(|(p, t)| (p.as_str(), *t)).collect();
        let (result, asked) = run_logged(&abs, "/src/out/a.isolate", &[("PRODUCT_DIR", "Release")]);
        assert_eq!(result.unwrap().files, i.files);
        assert_eq!(asked[2], "/src/common/sub/c.isolate");
    }

    #[test]
    fn own_command_wins_over_includes_and_later_includes_over_earlier() {
        let b1 = ("b1.isolate", "{'variables': {'command': ['one']}}");
        let b2 = ("b2.isolate", "{'variables': {'command': ['two']}}");
        let root = ("a.isolate", "{'includes': ['b1.isolate', 'b2.isolate']}");
        let i = run(&[root, b1, b2], "a.isolate", &[]).unwrap();
        assert_eq!(i.command.unwrap().args, ["two"]);
        let root = (
            "a.isolate",
            "{'includes': ['b1.isolate', 'b2.isolate'], 'variables': {'command': ['own']}}",
        );
        let i = run(&[root, b1, b2], "a.isolate", &[]).unwrap();
        assert_eq!(i.command.unwrap().args, ["own"]);
        // An empty command does not clear one given before.
        let root = ("a.isolate", "{'includes': ['b1.isolate'], 'variables': {'command': []}}");
        let i = run(&[root, b1], "a.isolate", &[]).unwrap();
        assert_eq!(i.command.unwrap().args, ["one"]);
    }

    #[test]
    fn include_cycles_depth_and_missing_files_are_reported() {
        let files = [
            ("x/a.isolate", "{'includes': ['../y/b.isolate']}"),
            ("y/b.isolate", "{'includes': ['../x/a.isolate']}"),
        ];
        let e = run(&files, "x/a.isolate", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "y/b.isolate:1:15: include cycle: x/a.isolate -> y/b.isolate -> x/a.isolate"
        );
        let e = run(&[("a.isolate", "{'includes': ['./a.isolate']}")], "a.isolate", &[]);
        assert_eq!(
            e.unwrap_err().to_string(),
            "a.isolate:1:15: include cycle: a.isolate -> a.isolate"
        );

        let e = run(&[("a.isolate", "{'includes': ['missing.isolate']}")], "a.isolate", &[]);
        assert_eq!(
            e.unwrap_err().to_string(),
            r#"a.isolate:1:15: cannot load include "missing.isolate": no such file"#
        );
        let e = run(&[], "./nope.isolate", &[]).unwrap_err();
        assert_eq!(e.to_string(), r#"cannot load "nope.isolate": no such file"#);

        // A diamond is no cycle, and each file is loaded once.
        let files = [
            ("a.isolate", "{'includes': ['b.isolate', 'c.isolate']}"),
            ("b.isolate", "{'includes': ['d.isolate']}"),
            ("c.isolate", "{'includes': ['d.isolate']}"),
            ("d.isolate", "{'variables': {'files': ['d.txt']}}"),
        ];
        let (result, asked) = run_logged(&files, "a.isolate", &[]);
        assert_eq!(listed(&result.unwrap()), ["d.txt"]);
        // Chromium loads includes from the last to the first.
        assert_eq!(asked, ["a.isolate", "c.isolate", "d.isolate", "b.isolate"]);

        // A chain longer than MAX_INCLUDE_DEPTH.
        let chain: Vec<(String, String)> = (0..MAX_INCLUDE_DEPTH + 4)
            .map(|n| (format!("f{n}.isolate"), format!("{{'includes': ['f{}.isolate']}}", n + 1)))
            .collect();
        let chain: Vec<(&str, &str)> =
            chain.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
        let e = run(&chain, "f0.isolate", &[]).unwrap_err();
        let last = MAX_INCLUDE_DEPTH - 1;
        assert_eq!(
            e,
            IsolateError::IncludeDepth {
                at: Location { file: format!("f{last}.isolate"), line: 1, column: 15 }
            }
        );
    }

    #[test]
    fn directories_are_flagged_and_bad_paths_refused() {
        let src = "{'variables': {'files': ['data/', 'data/sub/../more/', 'bin/tool', './', \
                   'x/./y', 'data/']}}";
        let i = one(src).unwrap();
        let entry = |path: &str, is_dir| FileEntry { path: path.into(), is_dir };
        assert_eq!(
            i.files,
            [
                entry(".", true),
                entry("bin/tool", false),
                entry("data", true),
                entry("data/more", true),
                entry("x/y", false),
            ]
        );
        for (path, reason) in [
            ("", "empty path"),
            ("/etc/passwd", "absolute path"),
            ("a/..", "names a directory but does not end in '/'"),
            (".", "names a directory but does not end in '/'"),
            ("a\\0b", "NUL byte in path"),
        ] {
            let e = one(&format!("{{'variables': {{'files': ['{path}']}}}}")).unwrap_err();
            assert!(
                matches!(&e, IsolateError::BadPath { reason: r, .. } if *r == reason),
                "{path}: {e}"
            );
        }
        let e = one("{'variables': {'files': ['data/', 'data']}}").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"t.isolate:1:35: path "data": listed both as a file and as a directory (ending in '/')"#
        );
    }

    #[test]
    fn paths_are_normalized_lexically() {
        assert_eq!(normalize("a/./b//c/../d"), "a/b/d");
        assert_eq!(normalize("../a/../../b"), "../../b");
        assert_eq!(normalize("/../a"), "/a");
        assert_eq!(normalize("a/.."), "");
        let rel = |p, b| relative_to(p, b);
        assert_eq!(rel("out/gen/x", "out").as_deref(), Some("gen/x"));
        assert_eq!(rel("common/x", "out/Release").as_deref(), Some("../../common/x"));
        assert_eq!(rel("../../x", "../a").as_deref(), Some("../../x"));
        assert_eq!(rel("out", "out").as_deref(), Some(""));
        // Climbing above the directory `out` is in needs that directory's name.
        assert_eq!(rel("out", "../common"), None);
        assert_eq!(rel("/src/out", "/common").as_deref(), Some("../src/out"));
        assert_eq!(parent("/a.isolate"), "/");
        assert_eq!(parent("a.isolate"), "");
    }

    #[test]
    fn limits_refuse_instead_of_overflowing() {
        let e = one(&"[".repeat(100_000)).unwrap_err();
        assert_eq!(
            e,
            IsolateError::TooDeep {
                at: Location { file: "t.isolate".into(), line: 1, column: 65 }
            }
        );
        let e = one(&"{'a': ".repeat(10_000)).unwrap_err();
        assert!(matches!(e, IsolateError::TooDeep { .. }), "{e}");
        // Exactly MAX_NESTING levels parse (and then fail as the wrong shape).
        let src = format!("{}{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        assert!(matches!(one(&src).unwrap_err(), IsolateError::Shape { .. }));
        for expr in ["not ".repeat(100_000) + "OS=='x'", "(".repeat(100_000)] {
            let e = cond(&expr).unwrap_err();
            assert!(matches!(e, IsolateError::TooDeep { .. }), "{e}");
        }
        let huge = format!("{{}}{}", " ".repeat(MAX_ISOLATE_BYTES));
        let e = one(&huge).unwrap_err();
        assert!(matches!(e, IsolateError::TooLarge { .. }), "{e}");
        // Substitution cannot blow a small file up without bound.
        let big = "x".repeat(1 << 20);
        let src = format!("{{'variables': {{'command': ['{}']}}}}", "<(B)".repeat(100));
        let e = run(&[("t.isolate", &src)], "t.isolate", &[("B", &big)]).unwrap_err();
        assert!(matches!(e, IsolateError::TooMuchExpansion { .. }), "{e}");
    }

    /// The command, its directory and the read-only level of an evaluation.
    fn how(i: &Isolate) -> (Option<Vec<String>>, Option<String>, Option<u8>) {
        let c = i.command.as_ref();
        (c.map(|c| c.args.clone()), c.map(|c| c.relative_cwd.clone()), i.read_only)
    }

    fn words(w: &[&str]) -> Option<Vec<String>> {
        Some(w.iter().map(|s| s.to_string()).collect())
    }

    // From Chromium's isolate_format_test.py, test_load_isolate_as_config: one file, several
    // conditions giving commands and read_only levels.
    #[test]
    fn chromium_one_file_of_several_commands() {
        let src = r#"{
          'conditions': [
            ['OS=="amiga" or OS=="atari" or OS=="coleco" or OS=="dendy"', {
              'variables': {'files': ['a', 'b', 'touched']},
            }],
            ['OS=="atari"', {
              'variables': {
                'files': ['c', 'd', 'touched_a', 'x'],
                'command': ['echo', 'Hello World'],
                'read_only': 2,
              },
            }],
            ['OS=="amiga" or OS=="coleco" or OS=="dendy"', {
              'variables': {
                'files': ['e', 'f', 'touched_e', 'x'],
                'command': ['echo', 'You should get an Atari'],
              },
            }],
            ['OS=="amiga"', {'variables': {'files': ['g'], 'read_only': 1}}],
            ['OS=="amiga" or OS=="atari" or OS=="dendy"', {'variables': {'files': ['h']}}],
          ],
        }"#;
        let atari = words(&["echo", "You should get an Atari"]);
        for (os, files, command, read_only) in [
            ("amiga", "a b e f g h touched touched_e x", atari.clone(), Some(1)),
            ("atari", "a b c d h touched touched_a x", words(&["echo", "Hello World"]), Some(2)),
            ("coleco", "a b e f touched touched_e x", atari.clone(), None),
            ("dendy", "a b e f h touched touched_e x", atari, None),
            ("vic20", "", None, None),
        ] {
            let i = run(&[("t.isolate", src)], "t.isolate", &[("OS", os)]).unwrap();
            assert_eq!(listed(&i).join(" "), files, "{os}");
            assert_eq!(how(&i), (command.clone(), command.map(|_| ".".into()), read_only), "{os}");
        }
    }

    // From test_load_with_globals and test_load_with_includes: a condition's read_only ranks
    // before the global one, and the including file's before its include's.
    #[test]
    fn chromium_read_only_of_conditions_and_includes() {
        let included = r#"{
          'variables': {'files': ['file_common']},
          'conditions': [
            ['OS=="linux"', {'variables': {'files': ['file_linux'], 'read_only': 1}}],
            ['OS=="mac" or OS=="win"', {'variables': {'files': ['file_non_linux'], 'read_only': 0}}],
          ],
        }"#;
        let root = r#"{
          'includes': ['included.isolate'],
          'variables': {'files': ['file_less_common'], 'read_only': 2},
          'conditions': [
            ['OS=="mac"', {'variables': {'files': ['file_mac'], 'read_only': 2}}],
          ],
        }"#;
        // The root's global read_only is removed for the first half.
        let root_no_global = root.replacen(", 'read_only': 2}", "}", 1);
        let files = [("root.isolate", root_no_global.as_str()), ("included.isolate", included)];
        for (os, want, ro) in [
            ("linux", "file_common file_less_common file_linux", Some(1)),
            ("mac", "file_common file_less_common file_mac file_non_linux", Some(2)),
            ("win", "file_common file_less_common file_non_linux", Some(0)),
            ("amiga", "file_common file_less_common", None),
        ] {
            let i = run(&files, "root.isolate", &[("OS", os)]).unwrap();
            assert_eq!((listed(&i).join(" "), i.read_only), (want.to_string(), ro), "{os}");
        }
        // A global read_only ranks after every condition's, the included file's too.
        let files = [("root.isolate", root), ("included.isolate", included)];
        for (os, ro) in [("linux", 1), ("mac", 2), ("win", 0), ("amiga", 2)] {
            let i = run(&files, "root.isolate", &[("OS", os)]).unwrap();
            assert_eq!(i.read_only, Some(ro), "{os}");
        }
    }

    /// Chromium's isolate_format_test.py, test_load_with_includes_with_commands(_and_variables):
    /// `3/root.isolate` includes `../1/isolate1.isolate` and `2/isolate2.isolate`, and gives no
    /// command itself.
    fn three_files(with_path: bool) -> Vec<(&'static str, String)> {
        let p = |s: &str| if with_path { format!("<(PATH)/{s}") } else { s.to_string() };
        let arg = if with_path { ", '<(PATH)'" } else { "" };
        vec![
            (
                "1/isolate1.isolate",
                format!(
                    "{{'conditions': [
                       ['OS==\"amiga\" or OS==\"win\"', {{'variables': {{
                         'command': ['foo', 'amiga_or_win'{arg}]}}}}],
                       ['OS==\"linux\"', {{'variables': {{
                         'command': ['foo', 'linux'{arg}], 'files': ['{}']}}}}],
                       ['OS==\"mac\" or OS==\"win\"', {{'variables': {{'files': ['{}']}}}}],
                     ]}}",
                    p("file_linux"),
                    p("file_non_linux")
                ),
            ),
            (
                "3/2/isolate2.isolate",
                format!(
                    "{{'conditions': [
                       ['OS==\"linux\" or OS==\"mac\"', {{'variables': {{
                         'command': ['foo', 'linux_or_mac'{arg}], 'files': ['{}']}}}}],
                     ]}}",
                    p("other/file")
                ),
            ),
            (
                "3/root.isolate",
                format!(
                    "{{'includes': ['../1/isolate1.isolate', '2/isolate2.isolate'],
                      'conditions': [
                        ['OS==\"amiga\"', {{'variables': {{'files': ['{}']}}}}],
                        ['OS==\"mac\"', {{'variables': {{'files': ['{}']}}}}],
                      ]}}",
                    p("file_amiga"),
                    p("file_mac")
                ),
            ),
        ]
    }

    #[test]
    fn chromium_commands_of_includes_and_their_directories() {
        let files = three_files(false);
        let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
        let cmd = |w: &str| words(&["foo", w]);
        for (os, want, command, cwd) in [
            // The command of isolate1 (in ../1), which is where it runs from.
            ("amiga", "file_amiga", cmd("amiga_or_win"), "../1"),
            // The last include's command wins: isolate2's, run from 2.
            ("linux", "../1/file_linux 2/other/file", cmd("linux_or_mac"), "2"),
            ("mac", "../1/file_non_linux 2/other/file file_mac", cmd("linux_or_mac"), "2"),
            ("win", "../1/file_non_linux", cmd("amiga_or_win"), "../1"),
        ] {
            let i = run(&files, "3/root.isolate", &[("OS", os)]).unwrap();
            assert_eq!(listed(&i).join(" "), want, "{os}");
            assert_eq!(how(&i), (command, Some(cwd.to_string()), None), "{os}");
            assert_eq!(i.isolate_dir, cwd);
        }

        // With a path variable (relative to the root file's directory, 3/): the files are the
        // same whichever file lists them, and the command's argument is re-expressed relative
        // to the directory the command runs from.
        let files = three_files(true);
        let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
        let cmd = |w: &str, path: &str| words(&["foo", w, path]);
        for (os, want, command, cwd) in [
            ("amiga", "data/file_amiga", cmd("amiga_or_win", "../3/data"), "../1"),
            ("linux", "data/file_linux data/other/file", cmd("linux_or_mac", "../data"), "2"),
            ("win", "data/file_non_linux", cmd("amiga_or_win", "../3/data"), "../1"),
        ] {
            let i = run(&files, "3/root.isolate", &[("OS", os), ("PATH", "data")]).unwrap();
            assert_eq!(listed(&i).join(" "), want, "{os}");
            assert_eq!(how(&i), (command, Some(cwd.to_string()), None), "{os}");
        }
        // Run from the root's own directory, the value is kept as written.
        let root = ("t.isolate", "{'variables': {'command': ['<(PATH)/x', '<(PATH)']}}");
        let i = run(&[root], "t.isolate", &[("PATH", "./out/")]).unwrap();
        assert_eq!(i.command.unwrap().args, ["./out//x", "./out/"]);
    }

    // From test_and_or_bug: a file that gives a command in any condition drops every command of
    // its includes, even when none of its own holds.
    #[test]
    fn chromium_drops_included_commands_when_the_includer_has_one() {
        let a = r#"{'conditions': [
          ['use_x11==0', {'variables': {'command': ['foo', 'x11=0']}}],
          ['OS=="linux" and chromeos==0', {'variables': {'command': ['foo', 'linux']}}],
        ]}"#;
        let b = r#"{'includes': ['a'],
          'conditions': [['use_x11==1', {'variables': {'command': ['foo', 'x11=1']}}]]}"#;
        let files = [("b", b), ("a", a)];
        let v = |x11| [("use_x11", x11), ("OS", "linux"), ("chromeos", "0")];
        let i = run(&files, "b", &v("1")).unwrap();
        assert_eq!(how(&i), (words(&["foo", "x11=1"]), Some(".".into()), None));
        let i = run(&files, "b", &v("0")).unwrap();
        assert_eq!(i.command, None);
        // a alone gives its own: the first in its order.
        let i = run(&files, "a", &v("0")).unwrap();
        assert_eq!(i.command.unwrap().args, ["foo", "x11=0"]);

        // A command only in a condition no values satisfy does not count.
        let b = "{'includes': ['a'], 'conditions': [\
                 ['OS==\"mac\" and OS==\"win\"', {'variables': {'command': ['never']}}]]}";
        let i = run(&[("b", b), ("a", a)], "b", &v("0")).unwrap();
        assert_eq!(i.command.unwrap().args, ["foo", "x11=0"]);
        // Nor does an empty one; a global one does.
        let b = "{'includes': ['a'], 'variables': {'command': []}}";
        let i = run(&[("b", b), ("a", a)], "b", &v("0")).unwrap();
        assert_eq!(i.command.unwrap().args, ["foo", "x11=0"]);
        let b = "{'includes': ['a'], 'variables': {'command': ['own']}}";
        let i = run(&[("b", b), ("a", a)], "b", &v("0")).unwrap();
        assert_eq!(i.command.unwrap().args, ["own"]);
        // A condition with too many ways to hold to try them all counts as satisfiable.
        let many = vec!["(use_x11==0 or use_x11==1)"; 20].join(" and ");
        let b = format!(
            "{{'includes': ['a'], 'conditions': [[{many:?}, {{'variables': {{'command': ['b']}}}}]]}}"
        );
        let i = run(&[("b", &b), ("a", a)], "b", &v("0")).unwrap();
        assert_eq!(i.command.unwrap().args, ["b"]);
        let v2 = [("use_x11", "2"), ("OS", "linux"), ("chromeos", "0")];
        assert_eq!(run(&[("b", &b), ("a", a)], "b", &v2).unwrap().command, None);
        // Dropped commands of an include's includes too, and the include's own are kept.
        let mid = "{'includes': ['a'], 'variables': {'command': ['mid']}}";
        let i = run(&[("top", "{'includes': ['mid']}"), ("mid", mid), ("a", a)], "top", &v("0"));
        assert_eq!(i.unwrap().command.unwrap().args, ["mid"]);
    }

    /// `files` holds "yes" when the file's own condition `expr` holds; the other conditions
    /// name the values `foo` (1, 2) and `bar` ("a", "b") are compared with.
    fn chromium_cond(expr: &str, v: &[(&str, &str)]) -> bool {
        let src = format!(
            "{{'conditions': [[{expr:?}, {{'variables': {{'files': ['yes']}}}}],
              ['foo==1 or foo==2 or bar==\"a\" or bar==\"b\"', {{'variables': {{}}}}]]}}"
        );
        let i = run(&[("t.isolate", &src)], "t.isolate", v).unwrap();
        !i.files.is_empty()
    }

    // From test_match_configs: Chromium only knew the values a file compares a variable with;
    // a condition that reaches a variable with another value does not hold.
    #[test]
    fn chromium_conditions_know_only_the_values_their_file_names() {
        let v = |foo, bar| [("foo", foo), ("bar", bar)];
        assert!(chromium_cond("(foo==1 or foo==2) and bar==\"b\"", &v("2", "b")));
        assert!(!chromium_cond("(foo==1 or foo==2) and bar==\"b\"", &v("2", "a")));
        assert!(chromium_cond("bar==\"b\"", &v("3", "b")));
        // foo=3 is unknown: reached first, it stops the condition; reached last, it is not
        // needed.
        assert!(!chromium_cond("foo==1 or bar==\"b\"", &v("3", "b")));
        assert!(chromium_cond("bar==\"b\" or foo==1", &v("3", "b")));
        assert!(chromium_cond("foo==1 or bar==\"b\"", &v("1", "x")));
        // Integers as Python compares them: a value of integer text is an integer.
        assert!(chromium_cond("foo==1", &v("01", "a")));
        assert!(chromium_cond("foo==1", &v(" +1 ", "a")));
        assert!(chromium_cond("foo==2", &v("0_2", "a")));
        assert!(!chromium_cond("foo==1", &v("1.0", "a")));
        assert!(!chromium_cond("bar==\"b\"", &v("1", " b")));
        // grid's additions are evaluated plainly, with every value known.
        assert!(chromium_cond("foo!=1 and bar==\"b\"", &v("3", "b")));
        assert!(chromium_cond("not foo==1 and bar==\"b\"", &v("3", "b")));
    }

    #[test]
    fn legacy_keys_are_files() {
        // chrome/unit_tests.isolate as it was in 2013.
        let src = r#"# Copyright (c) 2013 The Chromium Authors. All rights reserved.
{
  'conditions': [
    ['OS=="linux" or OS=="mac" or OS=="win"', {
      'variables': {
        'isolate_dependency_tracked': [
          '../testing/test_env.py',
          '<(PRODUCT_DIR)/unit_tests<(EXECUTABLE_SUFFIX)',
        ],
        'isolate_dependency_untracked': [
          '../net/data/ssl/certificates/',
          'test/data/',
        ],
      },
    }],
    ['OS=="linux"', {
      'variables': {
        'command': [
          '../testing/xvfb.py',
          '<(PRODUCT_DIR)',
          '<(PRODUCT_DIR)/unit_tests',
          '--test-launcher-summary-output=${ISOLATED_OUTDIR}/output.json',
        ],
        'isolate_dependency_tracked': [
          '../testing/xvfb.py',
          '<(PRODUCT_DIR)/xdisplaycheck',
        ],
        'isolate_dependency_touched': [
          '<(PRODUCT_DIR)/resources.pak',
        ],
        'files': ['<(PRODUCT_DIR)/locales/'],
      },
    }],
  ],
}
"#;
        let v = [("OS", "linux"), ("PRODUCT_DIR", "../out/Release"), ("EXECUTABLE_SUFFIX", "")];
        let i = run(&[("chrome/unit_tests.isolate", src)], "chrome/unit_tests.isolate", &v);
        let i = i.unwrap();
        assert_eq!(
            listed(&i),
            [
                "../net/data/ssl/certificates/",
                "../out/Release/locales/",
                "../out/Release/resources.pak",
                "../out/Release/unit_tests",
                "../out/Release/xdisplaycheck",
                "../testing/test_env.py",
                "../testing/xvfb.py",
                "test/data/",
            ]
        );
        let cmd = i.command.unwrap();
        // ${ISOLATED_OUTDIR} is the worker's to expand: kept as written.
        assert_eq!(
            cmd.args,
            [
                "../testing/xvfb.py",
                "../out/Release",
                "../out/Release/unit_tests",
                "--test-launcher-summary-output=${ISOLATED_OUTDIR}/output.json",
            ]
        );
        assert_eq!(cmd.relative_cwd, ".");
        assert_eq!(i.variable_dirs, ["../out/Release"]);
        // A legacy key in a branch not taken is checked and not applied.
        let v = [("OS", "win"), ("PRODUCT_DIR", "o"), ("EXECUTABLE_SUFFIX", ".exe")];
        let i = run(&[("u.isolate", src)], "u.isolate", &v).unwrap();
        assert_eq!(i.command, None);
        assert_eq!(listed(&i).len(), 4);
    }

    #[test]
    fn rebasing_above_a_relative_root_needs_its_absolute_directory() {
        let files = [
            ("unit_tests.isolate", "{'includes': ['../../base/b.isolate']}"),
            ("../../base/b.isolate", "{'variables': {'command': ['<(PRODUCT_DIR)/b', '-v']}}"),
        ];
        let v = vars(&[("PRODUCT_DIR", "out")]);
        let mut load = |p: &str| {
            files
                .iter()
                .find(|(n, _)| *n == p)
                .map(|(_, t)| t.to_string())
                .ok_or_else(|| "no such file".to_string())
        };
        let e = evaluate("unit_tests.isolate", &v, &mut load).unwrap_err();
        assert!(
            e.to_string().starts_with(
                r#"../../base/b.isolate:1:29: path "out": cannot be re-expressed relative to the command's directory"#
            ),
            "{e}"
        );
        let i = evaluate_from(Some("/src/chrome/x"), "unit_tests.isolate", &v, &mut load).unwrap();
        let cmd = i.command.unwrap();
        assert_eq!(cmd.args, ["../chrome/x/out/b", "-v"]);
        assert_eq!(cmd.relative_cwd, "../../base");
    }

    /// A condition of Chromium's dialect on the variables a, b and c.
    fn chromium_expr() -> impl Strategy<Value = String> {
        let leaf = (0usize..3, 0usize..4).prop_map(|(v, l)| {
            let var = ["a", "b", "c"][v];
            format!("{var}=={}", ["1", "2", "\"x\"", "\"y\""][l])
        });
        leaf.prop_recursive(3, 12, 3, |inner| {
            (proptest::collection::vec(inner, 2..4), any::<bool>())
                .prop_map(|(v, and)| format!("({})", v.join(if and { " and " } else { " or " })))
        })
    }

    /// The command Chromium's isolate_format.py gives for one file with a global command
    /// ("global") and one condition per expression (command "c0", "c1", ...), found its way:
    /// every key its enumeration of the literals makes, sorted as Python sorts their text, and
    /// the first dict with a command among those the given values match.
    fn chromium_command(exprs: &[&str], config: &BTreeMap<String, String>) -> Option<String> {
        let parsed: Vec<Expr> =
            exprs.iter().map(|e| parse_condition(e).ok().expect("a condition")).collect();
        let mut literals = BTreeMap::new();
        parsed.iter().for_each(|e| e.literals(&mut literals));
        let names: Vec<&String> = literals.keys().collect();
        let mut keys: Vec<Vec<Option<PyValue>>> = vec![Vec::new()];
        for n in &names {
            let choices: Vec<Option<PyValue>> =
                std::iter::once(None).chain(literals[*n].iter().cloned().map(Some)).collect();
            keys = keys
                .into_iter()
                .flat_map(|k| {
                    choices.iter().map(move |c| {
                        let mut k = k.clone();
                        k.push(c.clone());
                        k
                    })
                })
                .collect();
        }
        let text = |k: &[Option<PyValue>]| {
            let parts: Vec<String> = k
                .iter()
                .map(|v| match v {
                    None => "None".to_string(),
                    Some(PyValue::Int(i)) => i.clone(),
                    Some(PyValue::Str(s)) => format!("'{s}'"),
                })
                .collect();
            if parts.len() == 1 {
                format!("({},)", parts[0])
            } else {
                format!("({})", parts.join(", "))
            }
        };
        keys.sort_by_key(|k| text(k));
        let typed: BTreeMap<&String, PyValue> =
            config.iter().map(|(k, v)| (k, PyValue::of_var(v))).collect();
        for k in &keys {
            let matches = names
                .iter()
                .zip(k)
                .all(|(n, v)| v.as_ref().is_none_or(|v| typed.get(*n) == Some(v)));
            if !matches {
                continue;
            }
            if k.iter().all(Option::is_none) {
                return Some("global".to_string());
            }
            let bound =
                |name: &str| names.iter().position(|n| *n == name).and_then(|i| k[i].clone());
            if let Some(i) = parsed.iter().position(|e| e.eval(&bound) == Some(true)) {
                return Some(format!("c{i}"));
            }
        }
        None
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(src in any::<String>()) {
            let _ = one(&src);
        }

        #[test]
        fn python_like_text_never_panics(src in r#"[{}\[\]()'",:#<>=!\\ \nxa-c0-9_TrueNonotd/.-]{0,300}"#) {
            let _ = one(&src);
            let _ = cond(&src);
            let _ = one(&format!("{{'variables': {{'files': [{src:?}]}}}}"));
        }

        #[test]
        fn prefixes_of_a_real_file_never_panic(cut in 0usize..BASE_UNITTESTS.len()) {
            let cut = (0..=cut).rev().find(|&c| BASE_UNITTESTS.is_char_boundary(c)).unwrap_or(0);
            let v = [("OS", "linux"), ("asan", "0"), ("msan", "0"), ("PRODUCT_DIR", "o"),
                     ("EXECUTABLE_SUFFIX", "")];
            let result = run(&[("t.isolate", &BASE_UNITTESTS[..cut])], "t.isolate", &v);
            // Cutting before the final '}' always leaves something unclosed.
            let closed = cut > BASE_UNITTESTS.rfind('}').unwrap_or(0);
            prop_assert!(result.is_err() || closed);
        }

        #[test]
        fn chromium_s_command_is_the_one_its_enumeration_finds(
            exprs in proptest::collection::vec(chromium_expr(), 1..4),
            values in proptest::collection::vec(0usize..6, 3),
        ) {
            let given = ["1", "2", "x", "y", "z", "01"];
            let config: BTreeMap<String, String> = ["a", "b", "c"]
                .iter()
                .zip(&values)
                .map(|(n, &i)| (n.to_string(), given[i].to_string()))
                .collect();
            let conditions: Vec<String> = exprs
                .iter()
                .enumerate()
                .map(|(i, e)| format!("[{e:?}, {{'variables': {{'command': ['c{i}']}}}}]"))
                .collect();
            let src = format!(
                "{{'variables': {{'command': ['global']}}, 'conditions': [{}]}}",
                conditions.join(", ")
            );
            let pairs: Vec<(&str, &str)> =
                config.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let i = run(&[("t.isolate", &src)], "t.isolate", &pairs).unwrap();
            let ours = i.command.map(|c| c.args[0].clone());
            let exprs: Vec<&str> = exprs.iter().map(String::as_str).collect();
            prop_assert_eq!(ours, chromium_command(&exprs, &config), "{}", src);
        }

        #[test]
        fn nesting_is_refused_past_the_limit(depth in 1usize..400, dict in any::<bool>()) {
            let (open, close) = if dict { ("{'k': ", "}") } else { ("[", "]") };
            let src = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let e = one(&src).unwrap_err();
            prop_assert_eq!(matches!(e, IsolateError::TooDeep { .. }), depth > MAX_NESTING, "{}", e);
        }
    }
}
