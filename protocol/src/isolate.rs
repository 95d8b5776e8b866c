//! The `.isolate` source format: which files a test needs, as Chromium wrote it.
//!
//! An `.isolate` file is a Python literal holding one dict with up to three keys:
//! `variables` (`files`, a list of paths where a trailing `/` means a whole directory, and an
//! optional `command`), `conditions` (a list of `[expression, dict]` or
//! `[expression, dict, else-dict]`, the expression in GYP style: `OS=="linux" and asan==1`), and
//! `includes` (other `.isolate` files, relative to the including file's directory). Paths may use
//! `<(NAME)` substitution.
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
//! Beyond what Chromium accepted, conditions may use `!=`, `not`, parentheses and an else-dict.
//! Stricter than Python: adjacent string literals are not joined (a missing comma between two
//! paths is an error, not one merged path), keys may not repeat, and every variable a condition
//! names must be defined, even in a branch that short-circuits (as Chromium required).
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Isolate {
    /// The files and directories the test needs, sorted by path, each path once.
    pub files: Vec<FileEntry>,
    /// The last non-empty `command` given. A file's own command wins over its includes', and a
    /// later include's over an earlier one's.
    pub command: Option<Command>,
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
pub fn evaluate(
    root_path: &str,
    vars: &BTreeMap<String, String>,
    load: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<Isolate, IsolateError> {
    let root = normalize(root_path);
    let mut ev = Evaluator {
        vars,
        load,
        root_dir: parent(&root).to_string(),
        parsed: BTreeMap::new(),
        stack: Vec::new(),
        evaluations: 0,
        expanded: 0,
        files: BTreeMap::new(),
        command: None,
    };
    ev.file(&root, None)?;
    let files = ev.files.into_iter().map(|(path, is_dir)| FileEntry { path, is_dir }).collect();
    Ok(Isolate { files, command: ev.command })
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

#[derive(Debug)]
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
// Conditions: `==`, `!=`, `and`, `or`, `not`, parentheses; operands are strings, integers (as
// their decimal text) and variables. Every operand is evaluated, so an undefined variable is
// reported whichever branch would be taken.

enum CondError {
    Syntax(Pos, String),
    Undefined(Pos, String),
    TooDeep(Pos),
}

struct Cond<'a> {
    lex: Lexer<'a>,
    pos: Pos,
    tok: Tok,
    vars: &'a BTreeMap<String, String>,
}

fn eval_condition(text: &str, vars: &BTreeMap<String, String>) -> Result<bool, CondError> {
    let mut c = Cond { lex: Lexer::new(text), pos: START, tok: Tok::End, vars };
    c.advance()?;
    let v = c.or(0)?;
    if c.tok != Tok::End {
        return Err(c.unexpected("'and', 'or' or end of condition"));
    }
    Ok(v)
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

    fn or(&mut self, depth: usize) -> Result<bool, CondError> {
        let mut v = self.and(depth)?;
        while self.tok.is_word("or") {
            self.advance()?;
            let rhs = self.and(depth)?;
            v = v || rhs;
        }
        Ok(v)
    }

    fn and(&mut self, depth: usize) -> Result<bool, CondError> {
        let mut v = self.not(depth)?;
        while self.tok.is_word("and") {
            self.advance()?;
            let rhs = self.not(depth)?;
            v = v && rhs;
        }
        Ok(v)
    }

    fn not(&mut self, depth: usize) -> Result<bool, CondError> {
        if depth >= MAX_NESTING {
            return Err(CondError::TooDeep(self.pos));
        }
        if self.tok.is_word("not") {
            self.advance()?;
            return Ok(!self.not(depth + 1)?);
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
        Ok((lhs == rhs) == equal)
    }

    fn operand(&mut self) -> Result<String, CondError> {
        let v = match &self.tok {
            Tok::Str { text, .. } => text.clone(),
            Tok::Int(n) => n.to_string(),
            Tok::Ident(name) if !matches!(name.as_str(), "and" | "or" | "not") => {
                match self.vars.get(name) {
                    Some(v) => v.clone(),
                    None => return Err(CondError::Undefined(self.pos, name.clone())),
                }
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

/// `path` relative to `base`, both normalized and derived from `base` by joins, so `path` has
/// at least the leading `..` that `base` has. `""` is `base` itself.
fn relative_to(path: &str, base: &str) -> String {
    let p: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let b: Vec<&str> = base.split('/').filter(|c| !c.is_empty()).collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if b[common..].contains(&"..") {
        // Climbing out of an unknown directory: cannot happen for paths built from `base`.
        return path.to_string();
    }
    let mut out = vec![".."; b.len() - common];
    out.extend(&p[common..]);
    out.join("/")
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

struct Evaluator<'a> {
    vars: &'a BTreeMap<String, String>,
    load: &'a mut dyn FnMut(&str) -> Result<String, String>,
    /// The root file's directory, in the loader's terms.
    root_dir: String,
    /// Parsed files by path: a file included twice is loaded once.
    parsed: BTreeMap<String, Rc<Node>>,
    /// The files being evaluated, outermost first.
    stack: Vec<String>,
    evaluations: usize,
    expanded: usize,
    /// Path relative to `root_dir` -> is a directory.
    files: BTreeMap<String, bool>,
    command: Option<Command>,
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

impl Evaluator<'_> {
    /// Evaluates the file at `path` (normalized), included from `from` unless it is the root.
    fn file(&mut self, path: &str, from: Option<&Location>) -> Result<(), IsolateError> {
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
        self.root(path, parent(path), &doc)?;
        self.stack.pop();
        Ok(())
    }

    /// The top-level dict of `file`, whose directory is `dir`. Includes come first so that the
    /// file's own command wins over theirs.
    fn root(&mut self, file: &str, dir: &str, doc: &Node) -> Result<(), IsolateError> {
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
                self.file(&normalize(&join(dir, &s.text)), Some(&at))?;
            }
        }
        if let Some(node) = variables {
            self.variables(file, dir, node, true)?;
        }
        if let Some(node) = conditions {
            self.conditions(file, dir, node)?;
        }
        Ok(())
    }

    /// A `variables` dict. Its shape is always checked; its values are used when `apply`.
    fn variables(
        &mut self,
        file: &str,
        dir: &str,
        node: &Node,
        apply: bool,
    ) -> Result<(), IsolateError> {
        let entries = as_dict(file, node, "'variables' must be a dict")?;
        for (key, value) in entries {
            match key.text.as_str() {
                "files" => {
                    for (pos, s) in strings(file, "files", value)? {
                        if apply {
                            self.add_file(file, dir, pos, s)?;
                        }
                    }
                }
                "command" => {
                    let items = strings(file, "command", value)?;
                    if apply && !items.is_empty() {
                        let args = items
                            .into_iter()
                            .map(|(pos, s)| self.substitute(file, pos, s))
                            .collect::<Result<Vec<_>, _>>()?;
                        let cwd = relative_to(dir, &self.root_dir);
                        let relative_cwd = if cwd.is_empty() { ".".to_string() } else { cwd };
                        self.command = Some(Command { args, relative_cwd });
                    }
                }
                // 'read_only' and anything else: accepted, unused.
                _ => {}
            }
        }
        Ok(())
    }

    fn conditions(&mut self, file: &str, dir: &str, node: &Node) -> Result<(), IsolateError> {
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
            let Value::Str(expr) = &expr_node.value else {
                let found = expr_node.value.describe();
                let m = format!("a condition's expression must be a string; found {found}");
                return Err(shape(file, expr_node.pos, m));
            };
            let at = |p| inner_location(file, expr_node.pos, expr, p);
            let taken = eval_condition(&expr.text, self.vars).map_err(|e| match e {
                CondError::Syntax(p, message) => IsolateError::Condition { at: at(p), message },
                CondError::Undefined(p, name) => {
                    IsolateError::UndefinedVariable { at: at(p), name }
                }
                CondError::TooDeep(p) => IsolateError::TooDeep { at: at(p) },
            })?;
            self.branch(file, dir, then, taken)?;
            if let Some(o) = otherwise {
                self.branch(file, dir, o, !taken)?;
            }
        }
        Ok(())
    }

    fn branch(
        &mut self,
        file: &str,
        dir: &str,
        node: &Node,
        apply: bool,
    ) -> Result<(), IsolateError> {
        for (key, value) in as_dict(file, node, "a condition's branch must be a dict")? {
            if key.text != "variables" {
                let m = format!("unknown key {:?} in a condition; expected 'variables'", key.text);
                return Err(shape(file, key.pos, m));
            }
            self.variables(file, dir, value, apply)?;
        }
        Ok(())
    }

    /// One entry of a `files` list written at `pos` in `file`, whose directory is `dir`.
    fn add_file(&mut self, file: &str, dir: &str, pos: Pos, s: &Str) -> Result<(), IsolateError> {
        let raw = self.substitute(file, pos, s)?;
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
        let mut path = relative_to(&full, &self.root_dir);
        if path.is_empty() {
            path = ".".into();
        }
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

    /// `s` (written at `pos` in `file`) with every `<(NAME)` replaced by its value.
    fn substitute(&mut self, file: &str, pos: Pos, s: &Str) -> Result<String, IsolateError> {
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
        // The condition's command comes after the global one: the last writer wins.
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
                   'command': ['e\\\\f', 'nl\\n'], 'read_only':None,'x':[True,False,-3,{},[]],},}  # done";
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
        // Other keys under 'variables' are accepted and ignored.
        let i =
            one("{'variables': {'read_only': 2, 'isolate_dependency_tracked': ['x']}}").unwrap();
        assert_eq!(i, Isolate::default());
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
            ("asan=='1'", true),
            ("asan!=1", false),
            ("n==1", false),
            ("n=='01'", true),
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
        assert_eq!(asked, ["a.isolate", "b.isolate", "d.isolate", "c.isolate"]);

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
        assert_eq!(relative_to("out/gen/x", "out"), "gen/x");
        assert_eq!(relative_to("common/x", "out/Release"), "../../common/x");
        assert_eq!(relative_to("../../x", "../a"), "../../x");
        assert_eq!(relative_to("out", "out"), "");
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
        fn nesting_is_refused_past_the_limit(depth in 1usize..400, dict in any::<bool>()) {
            let (open, close) = if dict { ("{'k': ", "}") } else { ("[", "]") };
            let src = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let e = one(&src).unwrap_err();
            prop_assert_eq!(matches!(e, IsolateError::TooDeep { .. }), depth > MAX_NESTING, "{}", e);
        }
    }
}
