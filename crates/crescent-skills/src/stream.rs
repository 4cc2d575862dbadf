//! Streaming text deltas by full re-decode and suffix diff (Kestrel), holding back a trailing
//! U+FFFD (spec §11 #19).

/// The replacement character a lossy UTF-8 decode produces for an incomplete byte sequence.
pub const REPLACEMENT: char = '\u{FFFD}';

/// Turns successive full decodes of a growing token list into deltas.
///
/// While the last token ends inside a multi-byte character the decode ends with U+FFFD; that
/// tail is held back until a later decode completes the character (or [`TextStream::delta`] is
/// called with `flush`). For prefix-stable decoders (byte-level BPE) the concatenated deltas
/// equal the last full text.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    emitted: String,
}

impl TextStream {
    /// A stream that has emitted nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything emitted so far (the concatenation of all deltas).
    pub fn emitted(&self) -> &str {
        &self.emitted
    }

    /// The part of `full` (the decode of all tokens so far) not emitted yet, or `None` when
    /// there is nothing new. Unless `flush` is set, trailing U+FFFD characters are held back.
    /// If `full` no longer extends what was emitted (a decoder that rewrites earlier text),
    /// the text beyond the emitted byte length is sent, as Kestrel does.
    pub fn delta(&mut self, full: &str, flush: bool) -> Option<String> {
        let visible = if flush {
            full
        } else {
            full.trim_end_matches(REPLACEMENT)
        };
        let start = self.emitted.len();
        let new = if visible.starts_with(self.emitted.as_str()) {
            &visible[start..]
        } else {
            visible.get(start..)?
        };
        if new.is_empty() {
            return None;
        }
        self.emitted.push_str(new);
        Some(new.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_trailing_replacement_until_completed() {
        let mut s = TextStream::new();
        assert_eq!(s.delta("ca", false).as_deref(), Some("ca"));
        assert_eq!(s.delta("caf\u{FFFD}", false).as_deref(), Some("f"));
        assert_eq!(s.delta("café", false).as_deref(), Some("é"));
        assert_eq!(s.delta("café", false), None);
        assert_eq!(
            s.delta("café \u{FFFD}\u{FFFD}", false).as_deref(),
            Some(" ")
        );
        // flushing at the end sends the held-back tail
        assert_eq!(
            s.delta("café \u{FFFD}\u{FFFD}", true).as_deref(),
            Some("\u{FFFD}\u{FFFD}")
        );
        assert_eq!(s.emitted(), "café \u{FFFD}\u{FFFD}");
    }

    #[test]
    fn interior_replacement_is_sent_once_followed_by_text() {
        let mut s = TextStream::new();
        assert_eq!(s.delta("a\u{FFFD}", false).as_deref(), Some("a"));
        assert_eq!(s.delta("a\u{FFFD}b", false).as_deref(), Some("\u{FFFD}b"));
        assert_eq!(s.emitted(), "a\u{FFFD}b");
    }

    #[test]
    fn non_prefix_stable_decode_falls_back_to_byte_offset() {
        let mut s = TextStream::new();
        assert_eq!(s.delta("ab", false).as_deref(), Some("ab"));
        assert_eq!(s.delta("xyz", false).as_deref(), Some("z"));
        // the emitted length is not a char boundary of the new text: wait
        let mut s = TextStream::new();
        assert_eq!(s.delta("a", false).as_deref(), Some("a"));
        assert_eq!(s.delta("é", false), None);
    }
}
