//! Typed tokens: the decoder's input at one position is a text id, a coordinate or a size.

/// One position of the text sequence (spec §13, Kestrel's typed tokens).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Token {
    /// A vocabulary id, embedded through `wte`.
    Text(u32),
    /// A normalised coordinate (0..1), embedded through the region coordinate encoder.
    Coord(f32),
    /// A normalised box size (width, height), embedded through the region size encoder.
    Size(f32, f32),
}

impl Token {
    /// The text id, if this is a text token.
    pub fn text_id(&self) -> Option<u32> {
        match self {
            Token::Text(id) => Some(*id),
            _ => None,
        }
    }
}
