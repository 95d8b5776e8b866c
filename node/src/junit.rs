//! Reading the JUnit XML files shards write: which test cases failed, and the `<testsuite>`
//! elements to merge into one document.
//!
//! JUnit XML has no single schema; this reads what googletest, pytest and most other runners
//! write: a `<testsuites>` or `<testsuite>` root, `<testsuite>`s (possibly nested) holding
//! `<testcase classname=".." name="..">` elements, and a failing case holding one or more
//! `<failure>` or `<error>` children with a `message` attribute and/or a text body. Parsing is
//! done by `quick-xml`; this module owns only the JUnit vocabulary. It does not fetch or write
//! files (that is `submit`'s job).

use std::borrow::Cow;

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

/// Deepest element nesting read; deeper documents are refused (no runner nests that deep).
pub const MAX_DEPTH: usize = 256;
/// Longest first line of a failure message kept, in characters (the rest is cut with `…`).
pub const MAX_MESSAGE_CHARS: usize = 200;
/// Most bytes of a failure's text body read when it has no `message` attribute.
const MAX_BODY_BYTES: usize = 4096;

/// Why a file could not be read as JUnit XML.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JunitError {
    /// Not well-formed XML.
    #[error("not well-formed XML at byte {position}: {source}")]
    Xml {
        /// Where the reader stopped.
        position: u64,
        /// What it found.
        source: quick_xml::Error,
    },
    /// Well-formed XML whose root is not `<testsuites>` or `<testsuite>`.
    #[error("not JUnit XML: the root element is <{0}>")]
    NotJunit(String),
    /// No element at all.
    #[error("not JUnit XML: no root element")]
    Empty,
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("elements nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Whether a case failed an assertion or errored (JUnit's `<failure>` and `<error>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// `<failure>`: an assertion did not hold.
    Failure,
    /// `<error>`: the test could not run to an assertion (an exception, a fixture error).
    Error,
}

/// A test case that did not pass.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailedCase {
    /// The case's `classname` attribute (googletest: the suite; pytest: the module and class).
    pub classname: String,
    /// The case's `name` attribute.
    pub name: String,
    /// The case's `file` attribute, when the runner writes one (pytest's xunit1 family).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Failure or error (of its first `<failure>`/`<error>` child).
    pub kind: FailureKind,
    /// The first non-empty line of the first failure's message (or of its text), at most
    /// [`MAX_MESSAGE_CHARS`] characters; empty when it has neither.
    pub message: String,
}

impl FailedCase {
    /// The name people know the test by: `Suite.Test` for googletest, `module.Class.test` for
    /// pytest, or pytest's node id `path/to/test_x.py::Class::test` when the file is known.
    pub fn display_name(&self) -> String {
        if let Some(file) = &self.file
            && let Some(module) = file.strip_suffix(".py")
        {
            let module = module.replace('/', ".");
            let rest = if self.classname == module {
                Some("")
            } else {
                self.classname.strip_prefix(&module).and_then(|r| r.strip_prefix('.'))
            };
            if let Some(rest) = rest {
                let mut id = file.clone();
                for part in rest.split('.').filter(|p| !p.is_empty()) {
                    id.push_str("::");
                    id.push_str(part);
                }
                return format!("{id}::{}", self.name);
            }
        }
        if self.classname.is_empty() {
            self.name.clone()
        } else {
            format!("{}.{}", self.classname, self.name)
        }
    }
}

/// What one JUnit file holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The text of each outermost `<testsuite>` element, exactly as written in the file.
    pub suites: Vec<String>,
    /// The cases with a `<failure>` or `<error>`, in document order.
    pub failures: Vec<FailedCase>,
    /// Every case with the time it took (its `time` attribute), in document order, at most
    /// [`MAX_TIMED_CASES`].
    pub cases: Vec<TimedCase>,
}

/// Most cases a [`Report`] keeps the time of.
pub const MAX_TIMED_CASES: usize = 200_000;

/// One test case and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedCase {
    /// Its `classname` attribute.
    pub classname: String,
    /// Its `name` attribute.
    pub name: String,
    /// Its `time` attribute in seconds (0 when missing or not a number).
    pub seconds: f64,
    /// Whether it has a `<failure>` or `<error>`.
    pub failed: bool,
    /// Where it is: the index of its suite in [`Report::suites`] and the bytes of the
    /// `<testcase>` element in that suite's text; `None` for a case outside any suite.
    pub at: Option<(usize, std::ops::Range<usize>)>,
}

/// The case being read.
struct OpenCase {
    classname: String,
    name: String,
    file: Option<String>,
    failure: Option<(FailureKind, String)>,
    /// While inside the first `<failure>` without a usable `message`: the depth of that element
    /// and its text so far.
    body: Option<(usize, String)>,
}

/// Reads one JUnit XML document.
pub fn parse(xml: &str) -> Result<Report, JunitError> {
    let mut reader = Reader::from_str(xml);
    let mut report = Report::default();
    // How many elements are open.
    let mut depth = 0usize;
    let mut seen_root = false;
    // Start offset and depth of the outermost open <testsuite>.
    let mut suite: Option<(usize, usize)> = None;
    let mut case: Option<OpenCase> = None;
    // The index in `report.cases` of the `<testcase>` being read.
    let mut open_timed: Option<usize> = None;
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader
            .read_event()
            .map_err(|source| JunitError::Xml { position: reader.error_position(), source })?;
        let after = reader.buffer_position() as usize;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                let local = e.local_name();
                let tag = local.as_ref();
                if !seen_root {
                    seen_root = true;
                    if tag != b"testsuites" && tag != b"testsuite" {
                        return Err(JunitError::NotJunit(String::from_utf8_lossy(tag).into()));
                    }
                }
                if !empty {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(JunitError::TooDeep);
                    }
                }
                match tag {
                    b"testsuite" if suite.is_none() => {
                        if empty {
                            report.suites.extend(xml.get(before..after).map(str::to_string));
                        } else {
                            suite = Some((before, depth));
                        }
                    }
                    b"testcase" => {
                        if report.cases.len() < MAX_TIMED_CASES {
                            let seconds = attr(e, b"time")
                                .and_then(|t| t.trim().parse::<f64>().ok())
                                .filter(|t| t.is_finite() && *t >= 0.0)
                                .unwrap_or(0.0);
                            // Offsets into the suite's text; the end is set at `</testcase>`.
                            let at = suite.map(|(start, _)| {
                                let from = before - start;
                                (report.suites.len(), from..after - start)
                            });
                            report.cases.push(TimedCase {
                                classname: attr(e, b"classname").unwrap_or_default(),
                                name: attr(e, b"name").unwrap_or_default(),
                                seconds,
                                failed: false,
                                at,
                            });
                            open_timed = (!empty).then(|| report.cases.len() - 1);
                        }
                        let open = OpenCase {
                            classname: attr(e, b"classname").unwrap_or_default(),
                            name: attr(e, b"name").unwrap_or_default(),
                            file: attr(e, b"file").filter(|f| !f.is_empty()),
                            failure: None,
                            body: None,
                        };
                        // An empty <testcase/> has no failure: it passed.
                        case = (!empty).then_some(open);
                    }
                    b"failure" | b"error" => {
                        if let Some(i) = open_timed {
                            report.cases[i].failed = true;
                        }
                        if let Some(c) = case.as_mut().filter(|c| c.failure.is_none()) {
                            let kind = if tag == b"failure" {
                                FailureKind::Failure
                            } else {
                                FailureKind::Error
                            };
                            let message =
                                attr(e, b"message").map(|m| first_line(&m)).unwrap_or_default();
                            if message.is_empty() && !empty {
                                c.body = Some((depth, String::new()));
                            }
                            c.failure = Some((kind, message));
                        }
                    }
                    _ => {}
                }
            }
            Event::End(ref e) => {
                let local = e.local_name();
                let tag = local.as_ref();
                if let Some(c) = case.as_mut()
                    && let Some((_, text)) = c.body.take_if(|(at, _)| *at == depth)
                    && let Some((_, message)) = c.failure.as_mut()
                {
                    *message = first_line(&text);
                }
                if tag == b"testcase"
                    && let Some(i) = open_timed.take()
                    && let (Some((start, _)), Some((_, span))) =
                        (suite, report.cases[i].at.as_mut())
                {
                    span.end = after - start;
                }
                if tag == b"testcase"
                    && let Some(c) = case.take()
                    && let Some((kind, message)) = c.failure
                {
                    report.failures.push(FailedCase {
                        classname: c.classname,
                        name: c.name,
                        file: c.file,
                        kind,
                        message,
                    });
                }
                if let Some((start, d)) = suite
                    && d == depth
                {
                    report.suites.extend(xml.get(start..after).map(str::to_string));
                    suite = None;
                }
                depth = depth.saturating_sub(1);
            }
            Event::Text(ref t) => {
                let text = t.xml10_content().unwrap_or_default();
                push_body(&mut case, &text);
            }
            Event::CData(ref t) => {
                let text = t.xml10_content().unwrap_or_default();
                push_body(&mut case, &text);
            }
            Event::GeneralRef(ref r) => {
                let text: Cow<'_, str> = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string().into(),
                    _ => {
                        let name = r.decode().unwrap_or_default();
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .map_or_else(|| format!("&{name};").into(), Cow::Borrowed)
                    }
                };
                push_body(&mut case, &text);
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !seen_root {
        return Err(JunitError::Empty);
    }
    Ok(report)
}

/// Adds text to the failure body being read, if one is, up to [`MAX_BODY_BYTES`].
fn push_body(case: &mut Option<OpenCase>, text: &str) {
    if let Some((_, body)) = case.as_mut().and_then(|c| c.body.as_mut()) {
        let room = MAX_BODY_BYTES.saturating_sub(body.len());
        let mut end = room.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        body.push_str(&text[..end]);
    }
}

/// An attribute's value, unescaped; `None` when absent or unreadable.
fn attr(e: &BytesStart<'_>, key: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == key)
        .and_then(|a| a.normalized_value(XmlVersion::Implicit1_0).ok().map(Cow::into_owned))
}

/// The first non-empty line of `text`, trimmed, at most [`MAX_MESSAGE_CHARS`] characters.
fn first_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    // googletest starts with where the assertion is (`suite_test.cc:10`): keep what it says too.
    let is_location = !first.contains(' ')
        && first.rsplit_once(':').is_some_and(|(f, n)| !f.is_empty() && n.parse::<u32>().is_ok());
    let joined;
    let line = match lines.next() {
        Some(next) if is_location => {
            joined = format!("{first}: {next}");
            joined.as_str()
        }
        _ => first,
    };
    match line.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As pytest 8 writes it (`--junitxml`, the default xunit2 family).
    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="2" skipped="1" tests="5" time="0.114" timestamp="2025-03-02T10:11:12.345678+00:00" hostname="vm"><testcase classname="tests.test_x" name="test_a" time="0.001" /><testcase classname="tests.test_x" name="test_b" time="0.002"><failure message="assert 1 == 2">def test_b():
&gt;       assert 1 == 2
E       assert 1 == 2

tests/test_x.py:6: AssertionError</failure></testcase><testcase classname="tests.test_x.TestA" name="test_c[1-x]" time="0.001"><failure message="AssertionError: values differ&#10;assert 'a' == 'b'&#10;  - b&#10;  + a">self = &lt;tests.test_x.TestA object at 0x7f&gt;</failure></testcase><testcase classname="tests.test_x" name="test_d" time="0.000"><error message="failed on setup with &quot;fixture 'db' not found&quot;">file /w/tests/test_x.py, line 12
  def test_d(db):
E       fixture 'db' not found</error></testcase><testcase classname="tests.test_x" name="test_e" time="0.000"><skipped type="pytest.skip" message="not on linux">/w/tests/test_x.py:15: not on linux</skipped></testcase></testsuite></testsuites>"#;

    /// As googletest 1.14 writes it (`--gtest_output=xml:...`).
    const GTEST: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="3" failures="1" disabled="0" errors="0" time="0.002" timestamp="2025-03-02T10:11:12.345" name="AllTests">
  <testsuite name="Suite" tests="2" failures="1" disabled="0" skipped="0" errors="0" time="0.001" timestamp="2025-03-02T10:11:12.345">
    <testcase name="Passes" file="suite_test.cc" line="5" status="run" result="completed" time="0." timestamp="2025-03-02T10:11:12.345" classname="Suite" />
    <testcase name="Fails" file="suite_test.cc" line="9" status="run" result="completed" time="0." timestamp="2025-03-02T10:11:12.345" classname="Suite">
      <failure message="suite_test.cc:10&#x0A;Expected equality of these values:&#x0A;  1&#x0A;  2&#x0A;" type=""><![CDATA[suite_test.cc:10
Expected equality of these values:
  1
  2
]]></failure>
      <failure message="suite_test.cc:11&#x0A;Value of: false&#x0A;  Actual: false&#x0A;Expected: true&#x0A;" type=""><![CDATA[suite_test.cc:11
Value of: false]]></failure>
    </testcase>
  </testsuite>
  <testsuite name="Other" tests="1" failures="0" disabled="0" skipped="0" errors="0" time="0." timestamp="2025-03-02T10:11:12.346">
    <testcase name="Works" file="other_test.cc" line="3" status="run" result="completed" time="0." timestamp="2025-03-02T10:11:12.346" classname="Other" />
  </testsuite>
</testsuites>
"#;

    #[test]
    fn pytest_failures_and_errors_are_named_with_their_first_message_line() {
        let r = parse(PYTEST).unwrap();
        let got: Vec<(String, FailureKind, &str)> =
            r.failures.iter().map(|f| (f.display_name(), f.kind, f.message.as_str())).collect();
        assert_eq!(
            got,
            [
                ("tests.test_x.test_b".to_string(), FailureKind::Failure, "assert 1 == 2"),
                (
                    "tests.test_x.TestA.test_c[1-x]".to_string(),
                    FailureKind::Failure,
                    "AssertionError: values differ"
                ),
                (
                    "tests.test_x.test_d".to_string(),
                    FailureKind::Error,
                    "failed on setup with \"fixture 'db' not found\""
                ),
            ]
        );
        assert_eq!(r.suites.len(), 1);
        assert!(r.suites[0].starts_with("<testsuite name=\"pytest\""), "{}", r.suites[0]);
        assert!(r.suites[0].ends_with("</testsuite>"), "{}", r.suites[0]);
    }

    #[test]
    fn googletest_cases_are_suite_dot_test_and_count_once_however_many_assertions_fail() {
        let r = parse(GTEST).unwrap();
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        let f = &r.failures[0];
        assert_eq!(f.display_name(), "Suite.Fails");
        assert_eq!(f.message, "suite_test.cc:10: Expected equality of these values:");
        // googletest's `file` is a C++ file, not a pytest module: the name stays Suite.Fails.
        assert_eq!(f.file.as_deref(), Some("suite_test.cc"));
        assert_eq!(r.suites.len(), 2);
        assert!(r.suites[1].starts_with("<testsuite name=\"Other\""));
        assert!(r.suites[1].trim_end().ends_with("</testsuite>"));
        // The suites are the file's own text: re-parsing them finds the same failure.
        let again = parse(&r.suites[0]).unwrap();
        assert_eq!(again.failures, r.failures);
    }

    #[test]
    fn pytest_xunit1_files_give_node_ids() {
        let xml = r#"<testsuite name="pytest"><testcase classname="tests.test_x.TestA" name="test_b" file="tests/test_x.py" line="4"><failure message="assert 1 == 2"/></testcase><testcase classname="tests.test_x" name="test_c" file="tests/test_x.py"><failure message="x"/></testcase></testsuite>"#;
        let names: Vec<String> =
            parse(xml).unwrap().failures.iter().map(FailedCase::display_name).collect();
        assert_eq!(names, ["tests/test_x.py::TestA::test_b", "tests/test_x.py::test_c"]);
    }

    #[test]
    fn a_failure_without_a_message_attribute_uses_its_text() {
        let xml = "<testsuite><testcase name=\"t\"><failure>\n\n  boom &amp; bust\nmore</failure>\
                   </testcase><testcase name=\"u\"><error/></testcase></testsuite>";
        let r = parse(xml).unwrap();
        assert_eq!(r.failures[0].message, "boom & bust");
        assert_eq!((r.failures[1].name.as_str(), r.failures[1].message.as_str()), ("u", ""));
        assert_eq!(r.failures[1].kind, FailureKind::Error);
    }

    #[test]
    fn a_long_message_is_cut() {
        let long = "x".repeat(500);
        let xml = format!(
            "<testsuite><testcase name=\"t\"><failure message=\"{long}\"/></testcase></testsuite>"
        );
        let m = &parse(&xml).unwrap().failures[0].message;
        assert_eq!(m.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(m.ends_with('…'));
    }

    #[test]
    fn what_is_not_junit_is_refused_without_panicking() {
        assert!(matches!(parse("<coverage/>"), Err(JunitError::NotJunit(r)) if r == "coverage"));
        assert!(matches!(parse(""), Err(JunitError::Empty)));
        assert!(matches!(parse("<testsuite><testcase></testsuite>"), Err(JunitError::Xml { .. })));
        assert!(matches!(parse(&"<testsuite>".repeat(MAX_DEPTH + 1)), Err(JunitError::TooDeep)));
        // A lone suite with an attribute holding '>' and a comment before it.
        let r = parse("<!-- a > b --><testsuite name=\"a>b\"/>").unwrap();
        assert_eq!(r.suites, ["<testsuite name=\"a>b\"/>"]);
    }

    #[test]
    fn nested_suites_are_kept_whole_once() {
        let xml = "<testsuites><testsuite name=\"outer\"><testsuite name=\"inner\">\
                   <testcase name=\"t\" classname=\"C\"><failure message=\"m\"/></testcase>\
                   </testsuite></testsuite></testsuites>";
        let r = parse(xml).unwrap();
        assert_eq!(r.suites.len(), 1);
        assert!(r.suites[0].starts_with("<testsuite name=\"outer\">"));
        assert_eq!(r.failures[0].display_name(), "C.t");
    }

    proptest::proptest! {
        #[test]
        fn any_input_is_read_or_refused_without_panicking(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn any_cut_of_a_real_file_is_read_or_refused_without_panicking(cut in 0usize..2000) {
            let end = cut.min(GTEST.len());
            if GTEST.is_char_boundary(end) {
                let _ = parse(&GTEST[..end]);
            }
        }
    }
}
