//! Whole lines out of a stream of output chunks.
//!
//! A shard's live output arrives in chunks cut wherever the reads fell, often mid-line. Printed
//! as they come under a `[shard N]` prefix, one line shows as two. [`Lines`] holds the partial
//! last line of each chunk until its newline arrives (or the output ends), so what it hands on
//! is always whole lines, whatever the cuts.

/// Longest line held, in bytes; a longer one is handed on in pieces of this size, so a shard
/// that prints no newline cannot make grid buffer without bound.
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// Reassembles lines from chunks.
#[derive(Debug, Default)]
pub struct Lines {
    partial: String,
}

impl Lines {
    /// A new assembler with nothing held.
    pub fn new() -> Lines {
        Lines::default()
    }

    /// Adds a chunk and passes each line it completes to `out`, with its `\n`. A line longer
    /// than [`MAX_LINE_BYTES`] is passed in pieces of that size, without `\n` but the last.
    pub fn push(&mut self, chunk: &str, mut out: impl FnMut(&str)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let newline = rest.find('\n');
            if let Some(i) = newline
                && self.partial.len() + i <= MAX_LINE_BYTES
            {
                let (line, tail) = rest.split_at(i + 1);
                if self.partial.is_empty() {
                    out(line);
                } else {
                    self.partial.push_str(line);
                    out(&self.partial);
                    self.partial.clear();
                }
                rest = tail;
                continue;
            }
            // The line does not end in this chunk, or not within the limit: hold what fits.
            let content = newline.unwrap_or(rest.len());
            let mut take = (MAX_LINE_BYTES - self.partial.len()).min(content);
            while !rest.is_char_boundary(take) {
                take -= 1;
            }
            let (held, tail) = rest.split_at(take);
            self.partial.push_str(held);
            rest = tail;
            if !rest.is_empty() && !rest.starts_with('\n') {
                // More of the line follows and does not fit: the held piece is full.
                out(&self.partial);
                self.partial.clear();
            }
        }
    }

    /// Passes on the partial line held, if any (at the end of the output, or before a gap).
    pub fn flush(&mut self, mut out: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            out(&self.partial);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(chunks: &[&str]) -> Vec<String> {
        let mut l = Lines::new();
        let mut got = Vec::new();
        for c in chunks {
            l.push(c, |s| got.push(s.to_string()));
        }
        l.flush(|s| got.push(s.to_string()));
        got
    }

    #[test]
    fn a_cut_anywhere_gives_the_same_whole_lines() {
        let text = "[ RUN      ] a\n..\n\nnon-ascii: é ü 漢\n[  FAILED  ] a\nno newline at the end";
        let whole = assemble(&[text]);
        assert_eq!(
            whole,
            [
                "[ RUN      ] a\n",
                "..\n",
                "\n",
                "non-ascii: é ü 漢\n",
                "[  FAILED  ] a\n",
                "no newline at the end"
            ]
        );
        let cuts: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &i in &cuts {
            assert_eq!(assemble(&[&text[..i], &text[i..]]), whole, "cut at {i}");
            for &j in cuts.iter().filter(|&&j| j >= i) {
                let three = [&text[..i], &text[i..j], &text[j..]];
                assert_eq!(assemble(&three), whole, "cuts at {i} and {j}");
            }
        }
        // One byte (one character) at a time.
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(assemble(&refs), whole);
    }

    #[test]
    fn a_line_longer_than_the_limit_comes_in_pieces_however_it_is_cut() {
        let long = "é".repeat(MAX_LINE_BYTES); // 2 bytes each: two pieces and a bit
        let text = format!("short\n{long}\nafter\n");
        let whole = assemble(&[&text]);
        assert_eq!(whole.concat(), text, "nothing lost or added");
        assert_eq!(whole[0], "short\n");
        assert_eq!(whole.last().unwrap(), "after\n");
        assert!(whole.iter().all(|l| l.len() <= MAX_LINE_BYTES + 1), "bounded");
        // short, a full piece, the rest of the long line with its newline, after.
        assert_eq!(whole.len(), 4);
        for cut in [1, 7, 100, MAX_LINE_BYTES - 1, MAX_LINE_BYTES + 6, text.len() - 3] {
            let cut = (cut..).find(|&c| text.is_char_boundary(c)).unwrap();
            assert_eq!(assemble(&[&text[..cut], &text[cut..]]).concat(), text, "cut at {cut}");
            assert!(
                assemble(&[&text[..cut], &text[cut..]])
                    .iter()
                    .all(|l| l.len() <= MAX_LINE_BYTES + 1),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn nothing_in_nothing_out() {
        assert!(assemble(&[]).is_empty());
        assert!(assemble(&["", ""]).is_empty());
    }
}
